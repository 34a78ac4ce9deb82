#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (Debian/Ubuntu, as root), for the Slurm lab.
#
#   sudo scripts/start_slurm.sh        # install if missing, configure, start; prints `sinfo`
#   sudo scripts/start_slurm.sh stop   # stop the daemons it started
#
# 1. installs munge, slurmctld, slurmd and the client tools with apt-get if `slurmctld` is missing;
# 2. writes /etc/slurm/slurm.conf for ONE node (this host) with the CPUs and memory `slurmd -C` reports,
#    one partition `debug`, no cgroups (works inside containers);
# 3. starts munged, slurmctld and slurmd directly (no systemd needed) and waits until the node is idle.
# Exit status: 0 when the node is ready, 2 when Slurm cannot be installed here (not root, no apt-get),
# 1 on any other failure.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
SPOOL=/var/spool

stop() {
    for d in slurmd slurmctld munged; do
        if pid=$(pgrep -x "$d"); then kill $pid || true; fi
    done
}

if [[ "${1:-}" == "stop" ]]; then stop; exit 0; fi

if [[ $(id -u) -ne 0 ]]; then echo "start_slurm.sh: must run as root (it installs packages and starts daemons)" >&2; exit 2; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    if ! command -v apt-get >/dev/null; then echo "start_slurm.sh: Slurm is not installed and apt-get is missing" >&2; exit 2; fi
    echo "== installing munge and Slurm with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { echo "start_slurm.sh: apt-get update failed (no network?)" >&2; exit 2; }
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null \
        || { echo "start_slurm.sh: apt-get install failed" >&2; exit 2; }
fi

# ---- munge: one key shared by every daemon of the (one-node) cluster --------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged

# ---- slurm.conf for this host ----------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
# `slurmd -C` prints the node line Slurm detects; keep its memory (MB), leave 10% headroom
MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
MEM=$(( ${MEM:-1024} * 9 / 10 ))
mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd"
cat > "$CONF_DIR/slurm.conf" <<CONF
# written by scripts/start_slurm.sh: a one-node cluster on $HOST
ClusterName=lessons
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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

# ---- daemons ----------------------------------------------------------------
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
        idle*|mix*|alloc*) sinfo; exit 0 ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "start_slurm.sh: node $HOST did not become idle (state: ${state:-unknown}); see $LOG_DIR/*.log" >&2
exit 1
