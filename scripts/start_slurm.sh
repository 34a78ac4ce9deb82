#!/usr/bin/env bash
# Start a single-node Slurm cluster of its own on this machine (Debian/Ubuntu, as root), for the Slurm lab.
#
#   sudo scripts/start_slurm.sh          # install if missing, configure, start; prints `sinfo` and SLURM_CONF
#   export SLURM_CONF=/var/tmp/lessons-slurm/slurm.conf    # what sbatch/srun/sinfo then need (printed above)
#   sudo scripts/start_slurm.sh stop     # stop the daemons this script started, nothing else
#
# Everything lives in its own folder, $LESSONS_SLURM_DIR (default /var/tmp/lessons-slurm): slurm.conf,
# the munge key and socket, state, spool, logs and pid files. The system's /etc/slurm, a Slurm or munge
# already running on the machine, and their ports are left alone: this cluster listens on
# $LESSONS_SLURM_PORT and the next port (default 16817, 16818) and talks to its own munged.
#
# 1. installs munge, slurmctld, slurmd and the client tools with apt-get if they are missing: the packages
#    add the users munge and slurm, /etc/munge/munge.key, /etc/slurm/plugstack.conf(.d), /etc/default and
#    /etc/init.d entries, /var/lib and /var/log folders; neither this script nor `stop` removes them
#    (`apt-get purge munge slurmctld slurmd slurm-client` does), and no system service is started;
# 2. writes slurm.conf for ONE node (this host) with the CPUs and memory `slurmd -C` reports,
#    one partition `debug`, no cgroups (works inside containers);
# 3. starts munged, slurmctld and slurmd (no systemd), records their pids, waits until the node is idle.
# Exit status: 0 when the node is ready; 2 when Slurm is not installed and cannot be installed here
# (not root, no apt-get, apt-get failed); 1 on any other failure (the daemons' logs are named).
set -euo pipefail

DIR=${LESSONS_SLURM_DIR:-/var/tmp/lessons-slurm}
PORT=${LESSONS_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
RUN=$DIR/run
MUNGE_SOCKET=$DIR/munge/munge.socket

# stop the daemon whose pid file is $1 if that pid is still the daemon named $2
stop_one() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$name" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
        [[ -e /proc/$pid ]] && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    stop_one "$RUN/slurmd.pid" slurmd
    stop_one "$RUN/slurmctld.pid" slurmctld
    stop_one "$RUN/munged.pid" munged
}

if [[ "${1:-}" == "stop" ]]; then stop; exit 0; fi

missing=0
for tool in slurmctld slurmd munged sbatch; do command -v "$tool" >/dev/null || missing=1; done
if [[ $(id -u) -ne 0 ]]; then
    echo "start_slurm.sh: must run as root (it starts daemons, and installs Slurm if missing)" >&2; exit 2
fi
if (( missing )); then
    if ! command -v apt-get >/dev/null; then echo "start_slurm.sh: Slurm is not installed and apt-get is missing" >&2; exit 2; fi
    echo "== installing munge and Slurm with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { echo "start_slurm.sh: apt-get update failed (no network?)" >&2; exit 2; }
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null \
        || { echo "start_slurm.sh: apt-get install failed" >&2; exit 2; }
fi

fail() {
    echo "start_slurm.sh: $1; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 2>/dev/null || true
    stop
    exit 1
}

# a second start replaces this script's own daemons (never anyone else's)
stop
mkdir -p "$DIR" "$RUN" "$DIR/log" "$DIR/munge" "$DIR/state" "$DIR/spool"
chmod 0755 "$DIR"
chmod 0700 "$DIR/munge"

# ---- munge: a daemon of our own, with its own key and socket ----------------
if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none
fi
chmod 0400 "$DIR/munge/munge.key"
munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$RUN/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || fail "munged did not start"
chmod 0755 "$DIR/munge"  # the socket must be reachable by job steps

# ---- slurm.conf for this host ----------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
# `slurmd -C` prints the node line Slurm detects; keep its memory (MB), leave 10% headroom
MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
MEM=$(( ${MEM:-1024} * 9 / 10 ))
cat > "$CONF" <<CONF
# written by scripts/start_slurm.sh: a one-node cluster on $HOST, all of it under $DIR
ClusterName=lessons
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$CONF

# ---- daemons ----------------------------------------------------------------
slurmctld -f "$CONF" || fail "slurmctld did not start"
slurmd -f "$CONF" || fail "slurmd did not start"

for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
        idle*|mix*|alloc*)
            sinfo
            echo "SLURM_CONF=$CONF   (export it for sbatch, srun, sinfo, squeue, scontrol)"
            exit 0 ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
fail "node $HOST did not become idle (state: ${state:-unknown})"
