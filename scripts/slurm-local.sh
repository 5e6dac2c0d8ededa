#!/usr/bin/env bash
# A one-node SLURM cluster for tests, without systemd, everything under one directory.
#
#   scripts/slurm-local.sh DIR start    install (apt, as root) if needed, configure, start
#   scripts/slurm-local.sh DIR stop     cancel jobs, stop the daemons
#   source scripts/slurm-local.sh       for the functions slurm_install/slurm_start/slurm_stop
#
# After `start`: `source DIR/env.sh` (sets SLURM_CONF) and use sbatch, srun, squeue, ...
# Debian's slurm-wlm (22.05) packages; the daemons run as the calling user (root), with
# auth/none when the plugin exists (else munge, its key and socket under DIR), KillWait=5 s
# and a short credential lifetime so that a requeued job restarts after a few seconds.
# Ports: SLURM_LOCAL_PORT (slurmctld) and +1 (slurmd), default the first free pair from 6817.

slurm_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
       command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    # Keep the packages' maintainer scripts from starting system daemons.
    local policy=/usr/sbin/policy-rc.d made=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made=1
    fi
    apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null 2>&1
    local rc=$?
    [ -n "$made" ] && rm -f "$policy"
    return $rc
}

_slurm_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

slurm_stop() {
    local D; D=$(realpath -m "$1")
    [ -f "$D/slurm.conf" ] || return 0
    export SLURM_CONF=$D/slurm.conf
    if _slurm_alive "$D/run/slurmctld.pid"; then
        scancel --quiet --user="$(id -un)" 2>/dev/null
        for _ in $(seq 1 40); do
            [ -z "$(squeue -h 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    local p pid
    for p in slurmd slurmctld munged; do
        if _slurm_alive "$D/run/$p.pid"; then
            pid=$(cat "$D/run/$p.pid")
            kill "$pid"
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$D/run/$p.pid"
    done
}

slurm_start() {
    local D; D=$(realpath -m "$1")
    slurm_install || { echo "slurm-local: cannot install SLURM (needs root and apt-get)" >&2; return 1; }
    slurm_stop "$D"
    rm -rf "$D/state" "$D/spool" "$D/log"
    mkdir -p "$D/state" "$D/spool" "$D/log" "$D/run"
    chmod 755 "$D" "$D/run"

    local host cpus mem auth authinfo port user
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ { m = int($2 / 1024) - 1024; if (m < 256) m = int($2 / 1024); print m }' /proc/meminfo)
    user=$(id -un)
    port=${SLURM_LOCAL_PORT:-}
    if [ -z "$port" ]; then
        port=6817
        while ! { _port_free "$port" && _port_free $((port + 1)); }; do port=$((port + 2)); done
    fi
    auth=${SLURM_AUTH:-}
    if [ -z "$auth" ]; then
        if compgen -G "/usr/lib/*/slurm*/auth_none.so" >/dev/null ||
           compgen -G "/usr/lib*/slurm/auth_none.so" >/dev/null; then
            auth=none
        else
            auth=munge
        fi
    fi
    authinfo="cred_expire=5"   # a requeued job may start again after ~6 s (default 120 s)
    if [ "$auth" = munge ]; then
        mkdir -p "$D/munge" "$D/run/munge"
        chmod 700 "$D/munge"
        [ -s "$D/munge/munge.key" ] ||
            mungekey --create --keyfile="$D/munge/munge.key" 2>/dev/null ||
            dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$D/munge/munge.key"
        munged --key-file="$D/munge/munge.key" --socket="$D/run/munge/munge.socket" \
               --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" \
               --seed-file="$D/munge/munged.seed" || return 1
        authinfo="socket=$D/run/munge/munge.socket,$authinfo"
    fi

    cat > "$D/slurm.conf" <<CONF
ClusterName=lmgentest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/$auth
CredType=cred/$auth
AuthInfo=$authinfo
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    echo "export SLURM_CONF=$D/slurm.conf" > "$D/env.sh"
    export SLURM_CONF=$D/slurm.conf

    slurmctld -f "$SLURM_CONF" || return 1
    slurmd -f "$SLURM_CONF" || return 1
    local s=''
    for _ in $(seq 1 120); do
        s=$(sinfo -h -o %T 2>/dev/null)
        [ "$s" = idle ] && break
        sleep 0.25
    done
    if [ "$s" != idle ]; then
        echo "slurm-local: node not idle (state '$s'); logs in $D/log/" >&2
        tail -n 20 "$D"/log/*.log >&2
        return 1
    fi
    echo "slurm-local: up (auth/$auth, port $port, $cpus CPUs): export SLURM_CONF=$D/slurm.conf"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    if [ $# -ne 2 ]; then echo "usage: $0 DIR start|stop" >&2; exit 2; fi
    case "$2" in
        start) slurm_start "$1" ;;
        stop) slurm_stop "$1" ;;
        *) echo "usage: $0 DIR start|stop" >&2; exit 2 ;;
    esac
fi
