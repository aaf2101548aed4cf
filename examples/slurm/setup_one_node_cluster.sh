#!/usr/bin/env bash
# Start a one-node SLURM "cluster" on this machine, to try the sbatch scripts and the requeue path locally.
# Idempotent: re-running it reuses the installed packages, the munge key, the config and running daemons.
# Run as root. Tested on Debian 12 (slurm-wlm 22.05, munge 0.5.15), no systemd needed.
#
#   sudo bash examples/slurm/setup_one_node_cluster.sh       # start (or check) the cluster
#   sudo bash examples/slurm/teardown_one_node_cluster.sh    # stop it
#
# Environment overrides: SLURM_CONF_DIR (/etc/slurm), SLURM_STATE_DIR (/var/spool/slurm-lab),
# REAL_MEMORY_MB (min(2048, 1/2 of RAM)), WAIT_SECONDS (60).
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE_DIR=${SLURM_STATE_DIR:-/var/spool/slurm-lab}
LOG_DIR=/var/log/slurm-lab
WAIT_SECONDS=${WAIT_SECONDS:-60}
NODE=$(hostname -s)
CPUS=$(nproc)
RAM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEMORY_MB=${REAL_MEMORY_MB:-$(( RAM_MB / 2 < 2048 ? RAM_MB / 2 : 2048 ))}  # modest: slurmd refuses if above the real RAM

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y slurm-wlm munge
fi

# 2. munge key + daemon (munged must run as the munge user; /run/munge holds its socket)
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n </dev/null | unmunge >/dev/null || { echo "munged does not answer" >&2; exit 1; }

# 3. slurm.conf for this one node (rewritten each time, so a changed hostname or core count is picked up)
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" /run/slurm-lab
CONF="$CONF_DIR/slurm.conf"
NEW_CONF=$(cat <<CONF_EOF
# Minimal one-node cluster written by examples/slurm/setup_one_node_cluster.sh
ClusterName=lab
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=/run/slurm-lab/slurmctld.pid
SlurmdPidFile=/run/slurm-lab/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobCompType=jobcomp/none
MpiDefault=none
# jobs that call "scontrol requeue" come back; KillWait gives SIGTERM handlers time before SIGKILL
JobRequeue=1
KillWait=30
NodeName=$NODE CPUs=$CPUS RealMemory=$REAL_MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF_EOF
)
CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" > "$CONF"; CHANGED=1
fi
# Debian's slurmd reads cgroup.conf only with cgroup plugins; none are used here.

# 4. daemons (restart them if the config changed)
running() { pgrep -x "$1" >/dev/null; }
if [ "$CHANGED" = 1 ]; then
    for d in slurmd slurmctld; do
        if running "$d"; then
            kill "$(cat /run/slurm-lab/$d.pid 2>/dev/null || pgrep -x "$d")" 2>/dev/null || true
            for _ in $(seq 20); do running "$d" || break; sleep 0.5; done
        fi
    done
fi
running slurmctld || /usr/sbin/slurmctld
for _ in $(seq 20); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
running slurmd || /usr/sbin/slurmd

# 5. wait (bounded) for the node to be idle
deadline=$(( $(date +%s) + WAIT_SECONDS ))
state=""
while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
sinfo
case "$state" in
    idle|mixed|allocated) ;;
    *) echo "node $NODE is '$state' after ${WAIT_SECONDS}s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2; exit 1 ;;
esac

cat <<MSG

One-node SLURM cluster is up: node $NODE, $CPUS CPUs, RealMemory=${REAL_MEMORY_MB}M, partition "debug".
  config: $CONF    logs: $LOG_DIR    state: $STATE_DIR
  try:    srun -N1 -n2 hostname
  stop:   bash $(dirname "$0")/teardown_one_node_cluster.sh
MSG
