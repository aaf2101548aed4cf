#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by setup_one_node_cluster.sh: cancel jobs, stop slurmd, slurmctld, munged.
# Packages, the munge key, slurm.conf and the state folder are kept (setup is idempotent and reuses them).
# Pass --purge to also delete the job state (queued and requeued jobs are then forgotten).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
STATE_DIR=${SLURM_STATE_DIR:-/var/spool/slurm-lab}

if command -v scancel >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
    scancel --full --user=root 2>/dev/null || true   # every job of root, including batch shells
    for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
fi

stop() {  # stop a daemon by its pid file (or exact name), bounded wait, SIGKILL as a last resort
    local name=$1 pidfile=$2 pids
    pids=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pids" ] && kill -0 $pids 2>/dev/null || pids=$(pgrep -x "$name" || true)
    [ -z "$pids" ] && { echo "$name: not running"; return; }
    kill $pids 2>/dev/null || true
    for _ in $(seq 20); do kill -0 $pids 2>/dev/null || { echo "$name: stopped"; return; }; sleep 0.5; done
    kill -9 $pids 2>/dev/null || true; echo "$name: killed"
}
stop slurmd /run/slurm-lab/slurmd.pid
stop slurmctld /run/slurm-lab/slurmctld.pid
stop munged /run/munge/munged.pid

if [ "${1:-}" = "--purge" ]; then rm -rf "$STATE_DIR"; echo "removed $STATE_DIR"; fi
