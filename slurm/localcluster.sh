#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for tests and demos (root, no systemd needed).
#
#   slurm/localcluster.sh install   apt-get the Debian packages (slurmctld slurmd slurm-client)
#   slurm/localcluster.sh up        write a config, start slurmctld + slurmd, wait until the node is idle
#   slurm/localcluster.sh down      cancel the jobs, stop the two daemons this script started (by pid)
#   slurm/localcluster.sh status    is it up? (exit 0 if yes, 3 if not)
#   slurm/localcluster.sh env       print `export SLURM_CONF=...` for the shell that submits jobs
#
# `up` and `down` are idempotent. Everything (config, state, spool, logs, pid files) lives in
# $ENSEMBLE_BENCH_SLURM_DIR (default: ${TMPDIR:-/tmp}/ensemble-bench-slurm); nothing under /etc is
# touched, so clients need SLURM_CONF=$ENSEMBLE_BENCH_SLURM_DIR/slurm.conf (`env` prints it; the
# tests find it by themselves). Ports: $ENSEMBLE_BENCH_SLURM_PORT (slurmctld, default 16817) and the
# next one (slurmd), away from a system Slurm's 6817/6818.
#
# The node is this machine as `slurmd -C` reports it. No cgroups, no accounting daemon, no munge:
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, AuthType=auth/none (a test cluster that
# only listens on loopback). Jobs recovered from an unclean stop are cancelled at `up`.
set -euo pipefail

DIR="${ENSEMBLE_BENCH_SLURM_DIR:-${TMPDIR:-/tmp}/ensemble-bench-slurm}"
PORT="${ENSEMBLE_BENCH_SLURM_PORT:-16817}"
CONF="$DIR/slurm.conf"
CTLD_PID="$DIR/slurmctld.pid"
SLURMD_PID="$DIR/slurmd.pid"
WAIT_S="${ENSEMBLE_BENCH_SLURM_WAIT:-60}"
PACKAGES=(slurmctld slurmd slurm-client)

say() { echo "localcluster: $*"; }
die() { echo "localcluster: error: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# A pid from one of our pid files, if that process is alive and is the daemon we started with our
# config (the pid could have been recycled by an unrelated process after a crash).
our_pid() {
    local file="$1" name="$2" pid cmd
    [ -s "$file" ] || return 1
    pid="$(cat "$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmd" == *"$name"* && "$cmd" == *"$CONF"* ]] || return 1
    echo "$pid"
}

client() { SLURM_CONF="$CONF" "$@"; }

controller_responds() { client scontrol ping 2>/dev/null | grep -q "is UP"; }

node_state() { (client sinfo -h -N -o "%T" 2>/dev/null || true) | head -n1; }

slurm_version() { dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "version unknown"; }

cmd_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        say "slurm already installed ($(slurm_version))"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "installing needs root (apt-get install ${PACKAGES[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
    say "installed slurm $(slurm_version)"
}

write_config() {
    local host topo mem
    host="$(hostname -s)"
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    topo="$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')"
    [ -n "$topo" ] || die "slurmd -C reported nothing"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$topo")"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF.tmp" <<EOF
# written by slurm/localcluster.sh: a single-node test cluster, state under $DIR
ClusterName=ebench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 $topo State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    say "config $CONF (node $host: ${topo%% Boards*}, ${mem} MB)"
}

cancel_all_jobs() {
    local ids
    ids="$( (client squeue -h -o %A 2>/dev/null || true) | sort -u | tr '\n' ' ')"
    if [ -n "${ids// /}" ]; then
        # shellcheck disable=SC2086
        client scancel $ids 2>/dev/null || true
        echo "$ids"
    fi
}

start_daemon() {   # start_daemon NAME PIDFILE ARGS...: detached (own session), pid recorded
    local name="$1" pidfile="$2"
    shift 2
    setsid "$name" -D -f "$CONF" "$@" >>"$DIR/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$pidfile"
}

cmd_up() {
    local t0 ctld slurmd_pid recovered state
    t0="$(now)"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        || die "slurm is not installed: run '$0 install' (apt-get install ${PACKAGES[*]})"
    [ "$(id -u)" -eq 0 ] || die "the local cluster runs its daemons as root; run as root"
    if ctld="$(our_pid "$CTLD_PID" slurmctld)" && our_pid "$SLURMD_PID" slurmd >/dev/null && controller_responds; then
        say "already up (slurmctld pid $ctld); export SLURM_CONF=$CONF"
        return 0
    fi
    # half up (one daemon died): stop what is left of ours and start over
    stop_daemons quiet
    write_config
    start_daemon slurmctld "$CTLD_PID"
    for _ in $(seq 1 $((WAIT_S * 5))); do
        controller_responds && break
        our_pid "$CTLD_PID" slurmctld >/dev/null || { tail -n 20 "$DIR/log/slurmctld.log" >&2 || true; die "slurmctld exited; log: $DIR/log/slurmctld.log"; }
        sleep 0.2
    done
    controller_responds || die "slurmctld did not answer within ${WAIT_S}s; log: $DIR/log/slurmctld.log"
    # Jobs recovered from an unclean stop: hold the pending ones so they do not start, let slurmd come
    # back (it reattaches to job steps that outlived it), then cancel them all, which ends those steps.
    recovered="$( (client squeue -h -o %A 2>/dev/null || true) | sort -u | tr '\n' ' ')"
    if [ -n "${recovered// /}" ]; then
        # shellcheck disable=SC2086
        client scontrol hold $recovered >/dev/null 2>&1 || true
    fi
    start_daemon slurmd "$SLURMD_PID"
    state=""
    for _ in $(seq 1 $((WAIT_S * 5))); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated) break ;;   # registered ("*" would mean not responding yet)
            down|drain*) client scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        our_pid "$SLURMD_PID" slurmd >/dev/null || { tail -n 20 "$DIR/log/slurmd.log" >&2 || true; die "slurmd exited; log: $DIR/log/slurmd.log"; }
        sleep 0.2
    done
    if [ -n "${recovered// /}" ]; then
        # shellcheck disable=SC2086
        client scancel $recovered 2>/dev/null || true
        say "cancelled jobs recovered from an unclean stop: $recovered"
    fi
    for _ in $(seq 1 $((WAIT_S * 5))); do
        state="$(node_state)"
        case "$state" in
            idle) break ;;
            down|drain*) client scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        our_pid "$SLURMD_PID" slurmd >/dev/null || { tail -n 20 "$DIR/log/slurmd.log" >&2 || true; die "slurmd exited; log: $DIR/log/slurmd.log"; }
        sleep 0.2
    done
    [ "$state" = idle ] || die "node not idle within ${WAIT_S}s (state: ${state:-unknown}); logs in $DIR/log"
    say "up in $(elapsed "$t0") s (slurmctld pid $(cat "$CTLD_PID"), slurmd pid $(cat "$SLURMD_PID")); export SLURM_CONF=$CONF"
}

stop_pid() {   # stop_pid PID NAME: TERM, wait up to 10 s, then KILL
    local pid="$1" name="$2"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        [ -d "/proc/$pid" ] || { say "stopped $name (pid $pid)"; return 0; }
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $name (pid $pid) after 10 s"
}

stop_daemons() {
    local pid
    if pid="$(our_pid "$SLURMD_PID" slurmd)"; then stop_pid "$pid" slurmd; elif [ -z "${1:-}" ]; then say "slurmd not running"; fi
    if pid="$(our_pid "$CTLD_PID" slurmctld)"; then stop_pid "$pid" slurmctld; elif [ -z "${1:-}" ]; then say "slurmctld not running"; fi
    rm -f "$SLURMD_PID" "$CTLD_PID"
}

cmd_down() {
    local jobs left
    if our_pid "$CTLD_PID" slurmctld >/dev/null && controller_responds; then
        jobs="$(cancel_all_jobs)"
        if [ -n "$jobs" ]; then
            say "cancelled jobs: $jobs"
            # let slurmd end the jobs' processes before it stops
            for _ in $(seq 1 75); do
                left="$(client squeue -h -t running,completing -o %A 2>/dev/null | wc -l)"
                [ "$left" -eq 0 ] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemons
    # a clean stop leaves nothing to recover; logs stay for inspection
    rm -rf "$DIR/state" "$DIR/spool"
    say "down"
}

cmd_status() {
    local ctld slurmd_pid
    if ctld="$(our_pid "$CTLD_PID" slurmctld)" && slurmd_pid="$(our_pid "$SLURMD_PID" slurmd)" && controller_responds; then
        say "up: slurmctld pid $ctld, slurmd pid $slurmd_pid, node $(node_state); SLURM_CONF=$CONF"
        return 0
    fi
    say "down"
    return 3
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
