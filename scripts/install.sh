#!/usr/bin/env bash
# Install lmgen for a cluster: the binary, its documentation and an Lmod modulefile.
#
#   scripts/install.sh PREFIX
#
# puts in place
#   PREFIX/bin/lmgen
#   PREFIX/share/doc/lmgen/            README, docs/
#   PREFIX/modulefiles/lmgen/VERSION.lua
# so that users run `module use PREFIX/modulefiles && module load lmgen`.
#
# Environment:
#   LMGEN_BIN=FILE        install this binary instead of building one
#   LMGEN_FEATURES=cuda   cargo features of the build (default: none, CPU only)
#   LMGEN_SITE_MODELS=F   the site models file the module points LMGEN_MODELS at when it
#                         exists (default: PREFIX/etc/lmgen/models.toml)
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
PREFIX=$(cd "$1" && pwd)

if [ -n "${LMGEN_BIN:-}" ]; then
    BIN=$LMGEN_BIN
    [ -x "$BIN" ] || { echo "install.sh: LMGEN_BIN=$BIN is not an executable file" >&2; exit 2; }
else
    feat=()
    [ -n "${LMGEN_FEATURES:-}" ] && feat=(--features "$LMGEN_FEATURES")
    echo "install.sh: cargo build --release -p lmgen-cli ${feat[*]}" >&2
    (cd "$ROOT" && cargo build --release -p lmgen-cli "${feat[@]}")
    BIN=$ROOT/target/release/lmgen
fi

# The module is named after the version of the binary itself.
VERSION=$("$BIN" --version | awk 'NR == 1 { print $2 }')
COMMIT=$("$BIN" --version | awk -F': ' '$1 == "commit" { print $2 }')
FEATURES=$("$BIN" --version | awk -F': ' '$1 == "features" { print $2 }')
[ -n "$VERSION" ] || { echo "install.sh: $BIN --version printed no version" >&2; exit 1; }
SITE_MODELS=${LMGEN_SITE_MODELS:-$PREFIX/etc/lmgen/models.toml}
case "$PREFIX$SITE_MODELS" in
    *']]'* | *'"'* | *'\'*) echo "install.sh: paths must not contain ]], \" or \\" >&2; exit 2 ;;
esac

install -d "$PREFIX/bin" "$PREFIX/share/doc/lmgen/docs" "$PREFIX/modulefiles/lmgen"
install -m 0755 "$BIN" "$PREFIX/bin/lmgen.new"
mv -f "$PREFIX/bin/lmgen.new" "$PREFIX/bin/lmgen"   # atomic for running jobs
install -m 0644 "$ROOT/README.md" "$PREFIX/share/doc/lmgen/"
install -m 0644 "$ROOT"/docs/*.md "$PREFIX/share/doc/lmgen/docs/"
if [ -z "${LMGEN_SITE_MODELS:-}" ]; then
    install -d "$PREFIX/etc/lmgen"
    cat > "$PREFIX/etc/lmgen/models.toml.example" <<'TOML'
# Site models file: copy to models.toml beside this file; `module load lmgen` then sets
# LMGEN_MODELS to it, and `lmgen MODEL` accepts these aliases.
[models]
# galactica-6.7b = "/shared/models/galactica-6.7b"
# smollm2-135m = { path = "/shared/models/SmolLM2-135M-Instruct-Q8_0.gguf" }
TOML
fi

MODFILE=$PREFIX/modulefiles/lmgen/$VERSION.lua
cat > "$MODFILE.new" <<LUA
-- lmgen $VERSION (commit $COMMIT), installed by lmgen's scripts/install.sh
help([[
lmgen $VERSION: run Hugging Face causal language models from their checkpoints,
one self-contained binary (no Python, no internet on compute nodes).

  lmgen generate MODEL --input prompts.jsonl --output out.jsonl
  lmgen score MODEL --input texts.txt --output scores.jsonl
  lmgen embed MODEL --input texts.txt --output hidden.safetensors
  lmgen sbatch --array 8 -- MODEL --input IN --output OUT   (a SLURM job script)
  lmgen --help, lmgen COMMAND --help

Build: $FEATURES; commit $COMMIT.
Documentation: $PREFIX/share/doc/lmgen/ (docs/cli.md is the full reference).
Models: a directory, a .gguf file, a Hugging Face cache id, or an alias from the
site models file $SITE_MODELS
(LMGEN_MODELS is set to it when it exists; --models-file FILE uses another).
]])

whatis("Name: lmgen")
whatis("Version: $VERSION")
whatis("Category: tools, machine learning")
whatis("Description: batch generation, scoring and hidden states of Hugging Face causal LMs; SLURM array jobs, resumable")

local root = "$PREFIX"
prepend_path("PATH", pathJoin(root, "bin"))
setenv("LMGEN_ROOT", root)
setenv("LMGEN_DOC", pathJoin(root, "share/doc/lmgen"))

-- Site models file (aliases of shared checkpoints), when the site provides one.
local site_models = "$SITE_MODELS"
if isFile(site_models) then
    setenv("LMGEN_MODELS", site_models)
end
LUA
mv -f "$MODFILE.new" "$MODFILE"
chmod 0644 "$MODFILE"

echo "installed lmgen $VERSION into $PREFIX"
echo "  binary:     $PREFIX/bin/lmgen"
echo "  docs:       $PREFIX/share/doc/lmgen/"
echo "  module:     $MODFILE"
echo "  models:     $SITE_MODELS (LMGEN_MODELS when it exists)"
echo "use:  module use $PREFIX/modulefiles && module load lmgen"
