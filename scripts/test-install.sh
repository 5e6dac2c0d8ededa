#!/usr/bin/env bash
# Test scripts/install.sh with real Lmod: install into a temporary prefix, then
# `module use`, `module load lmgen`, `lmgen --version`, `module help lmgen`, the site
# models hook, `module unload`.
#
#   scripts/test-install.sh
#
# Uses LMGEN_BIN if set, else the newer of target/release/lmgen and target/debug/lmgen (building
# the latter if neither exists). Installs Lmod with apt-get when it is missing and this runs as
# root; skips (exit 0, with a message) where Lmod is not available and cannot be installed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

skip() { echo "test-install: SKIP: $*"; exit 0; }

find_lmod_init() {
    local f
    for f in "${LMOD_PKG:+$LMOD_PKG/init/bash}" /usr/share/lmod/lmod/init/bash \
             /usr/share/lmod/lmod/init/profile /opt/apps/lmod/lmod/init/bash; do
        [ -n "$f" ] && [ -r "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

INIT=$(find_lmod_init) || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test-install: installing Lmod (apt-get install lmod)"
        apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lmod >/dev/null 2>&1 ||
            skip "apt-get install lmod failed"
        INIT=$(find_lmod_init) || skip "Lmod installed but its bash init file was not found"
    else
        skip "Lmod is not installed and cannot be installed here (needs root and apt-get)"
    fi
}

BIN=${LMGEN_BIN:-}
if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/lmgen" "$ROOT/target/debug/lmgen"; do   # the newer one
        [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; } && BIN=$b
    done
fi
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build -p lmgen-cli) || { echo "test-install: FAIL: build"; exit 1; }
    BIN=$ROOT/target/debug/lmgen
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/lmgen-install.XXXXXX")
trap 'rm -rf "$T"' EXIT
P=$T/prefix
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

LMGEN_BIN=$BIN "$ROOT/scripts/install.sh" "$P" || { echo "FAIL: install.sh"; exit 1; }
VERSION=$("$BIN" --version | awk 'NR == 1 { print $2 }')
[ -x "$P/bin/lmgen" ] && pass "binary installed" || fail "no $P/bin/lmgen"
[ -r "$P/share/doc/lmgen/README.md" ] && [ -r "$P/share/doc/lmgen/docs/cli.md" ] &&
    pass "docs installed" || fail "docs missing"
[ -r "$P/modulefiles/lmgen/$VERSION.lua" ] && pass "modulefile lmgen/$VERSION.lua" ||
    fail "no modulefile lmgen/$VERSION.lua"

# A clean module environment, as on a login node.
unset LMGEN_MODELS LMGEN_ROOT LMGEN_DOC LOADEDMODULES _LMFILES_ MODULEPATH
export PATH=/usr/local/bin:/usr/bin:/bin
# shellcheck disable=SC1090
source "$INIT"
type module >/dev/null 2>&1 || { echo "FAIL: the module command is not defined by $INIT"; exit 1; }

module use "$P/modulefiles"
module load lmgen || fail "module load lmgen"
[ "$(command -v lmgen)" = "$P/bin/lmgen" ] && pass "module load lmgen puts $P/bin first on PATH" ||
    fail "lmgen on PATH is '$(command -v lmgen)'"
echo "--- lmgen --version"
lmgen --version || fail "lmgen --version"
lmgen --version | grep -q "^lmgen $VERSION$" && pass "lmgen --version" || fail "lmgen --version output"
echo "--- module help lmgen"
module help lmgen 2>&1 | tee "$T/help.txt"
grep -q "lmgen $VERSION: run Hugging Face" "$T/help.txt" && pass "module help lmgen" ||
    fail "module help lmgen"
module whatis lmgen 2>&1 | grep -q "Version: $VERSION" && pass "module whatis lmgen" ||
    fail "module whatis lmgen"
module list 2>&1 | grep -q "lmgen/$VERSION" && pass "module list shows lmgen/$VERSION" ||
    fail "module list"
[ -z "${LMGEN_MODELS:-}" ] && pass "no site models file: LMGEN_MODELS unset" ||
    fail "LMGEN_MODELS=$LMGEN_MODELS without a site file"

# The site models file hook: once the file exists, loading the module points LMGEN_MODELS
# at it and its aliases work.
cat > "$P/etc/lmgen/models.toml" <<TOML
[models]
tiny-llama = "$ROOT/tests/fixtures/llama"
TOML
module unload lmgen
module load lmgen
[ "${LMGEN_MODELS:-}" = "$P/etc/lmgen/models.toml" ] && pass "site models file: LMGEN_MODELS set" ||
    fail "LMGEN_MODELS='${LMGEN_MODELS:-}'"
lmgen plan tiny-llama --device cpu >/dev/null 2>"$T/plan.err" && pass "alias from the site models file resolves" ||
    fail "lmgen plan tiny-llama: $(cat "$T/plan.err")"
module unload lmgen
[ -z "$(command -v lmgen)" ] && [ -z "${LMGEN_MODELS:-}" ] && pass "module unload lmgen restores the environment" ||
    fail "after unload: lmgen=$(command -v lmgen) LMGEN_MODELS=${LMGEN_MODELS:-}"

if [ "$fails" = 0 ]; then echo "test-install: all passed"; else echo "test-install: $fails failed"; exit 1; fi
