#!/usr/bin/env bash
# Manual check on a (one-node) SLURM cluster, not part of pytest: a job in which one rank is SIGKILLed
# mid-run is requeued by its batch script, resumes from the newest RoundCheckpoint, and ends with the same
# final parameters as an uninterrupted job. Every strategy; about 3-4 minutes each (SLURM's requeue hold).
#   sudo bash examples/slurm/setup_one_node_cluster.sh
#   bash tests/slurm/check_kill_requeue.sh [strategy ...]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
LAB=${LAB:-/tmp/slurm_lab/kill-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python}
STRATEGIES=("$@")
[ ${#STRATEGIES[@]} -gt 0 ] || STRATEGIES=(local_sgd vrl_sgd overlap_local_sgd cocod_sgd)
mkdir -p "$LAB"
command -v sbatch >/dev/null && sinfo -h >/dev/null 2>&1 || { echo "no SLURM cluster answers"; exit 2; }

JOBS=()
cancel_jobs() { for job in "${JOBS[@]}"; do scancel "$job" 2>/dev/null || true; done; }
trap cancel_jobs EXIT

submit() {  # submit RUN_DIR EXTRA_ARGS... -> job id
    local dir=$1; shift
    mkdir -p "$dir"
    cat > "$dir/job.sbatch" <<SBATCH
#!/bin/bash
#SBATCH --job-name=kill-check
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$dir/job.out
cd "$dir"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO" SRUN_CPUS_PER_TASK=1
echo "start SLURM_RESTART_COUNT=\${SLURM_RESTART_COUNT:-0}"
status=0
srun --kill-on-bad-exit=1 $PYTHON $REPO/tests/e2e/fault_case.py --out . --distinct --epochs 2 --batches 24 \\
    --round-ckpt 2 $* || status=\$?
echo "srun exited with \$status"
if [ "\$status" -ne 0 ] && [ "\${SLURM_RESTART_COUNT:-0}" -lt 1 ]; then scontrol requeue "\$SLURM_JOB_ID"; fi
exit "\$status"
SBATCH
    sbatch --parsable "$dir/job.sbatch"
}

wait_done() {  # wait_done JOB SECONDS -> 0 when COMPLETED
    local deadline=$(( $(date +%s) + $2 )) state
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')
        [ "$state" = COMPLETED ] && return 0
        case "$state" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) return 1 ;; esac
        sleep 3
    done
    return 1
}

fails=0
for strategy in "${STRATEGIES[@]}"; do
    ref=$(submit "$LAB/$strategy/uninterrupted" --strategy "$strategy"); JOBS+=("$ref")
    killed=$(submit "$LAB/$strategy/killed" --strategy "$strategy" --kill-at 30); JOBS+=("$killed")
    wait_done "$ref" 300 && wait_done "$killed" 420
    verdict=$("$PYTHON" - "$LAB/$strategy" <<'PY'
import sys, torch
from pathlib import Path
lab = Path(sys.argv[1])
out = (lab / "killed" / "job.out").read_text()
want = torch.load(lab / "uninterrupted" / "rank0.pt", weights_only=False)["final"]
got = [torch.load(lab / "killed" / f"rank{r}.pt", weights_only=False) for r in range(2)]
restarted = "start SLURM_RESTART_COUNT=1" in out
resumed_at = got[0]["steps"][0]["global_step"]
diff = max((g["final"] - want).abs().max().item() for g in got)
ok = restarted and resumed_at > 1 and diff <= 1e-6
print(f"{'PASS' if ok else 'FAIL'}: requeued={restarted} first step after restart={resumed_at} max |diff|={diff:.3g}")
PY
)
    echo "$strategy: ${verdict:-FAIL: no result (see $LAB/$strategy/*/job.out)}"
    [[ "$verdict" == PASS* ]] || fails=$((fails + 1))
done
exit "$fails"
