#!/usr/bin/env bash
# End-to-end check of SLURM auto-requeue with a local-SGD strategy, on a real (e.g. one-node) cluster:
#   1. submit train_cpu.sbatch (a short run), wait until it has trained SIGNAL_AT_STEP steps,
#   2. `scancel --signal=USR1 JOB` (what SLURM does 90 s before the wall time): Lightning writes
#      hpc_ckpt_1.ckpt and runs `scontrol requeue`; the requeued job resumes from it,
#   3. verify (a) the hpc checkpoint was written, (b) the job restarted with SLURM_RESTART_COUNT=1,
#      (c) it resumed from the saved global step, not from 0, (d) it finished,
#   4. run the same job uninterrupted and check (e) that the final weights are identical (the strategy
#      fast-forwards the data after a mid-epoch resume, so the requeued run trains on the same batches).
# Run from the repository root, with the cluster up (setup_one_node_cluster.sh):
#   bash examples/slurm/check_requeue.sh                                   # local SGD (cpu_local_sgd.yaml)
#   bash examples/slurm/check_requeue.sh --trainer.strategy=lightning_localsgd.VRLSGDStrategy
# Extra arguments are passed to the LightningCLI of both runs. Every wait is bounded; jobs it submitted are
# cancelled on exit if still queued. Exit status 0 = PASS.
# Environment: LAB (output folder, default /tmp/slurm_lab/check-<time>), CONFIG, EPOCHS (8), BATCH_SIZE (8),
# SIGNAL_AT_STEP (300), FINISH_TIMEOUT (360 s after the signal), RUN_TIMEOUT (300 s for the reference run).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
LAB=${LAB:-/tmp/slurm_lab/check-$(date +%Y%m%d-%H%M%S)}
CONFIG=${CONFIG:-examples/slurm/cpu_local_sgd.yaml}
EPOCHS=${EPOCHS:-8}
BATCH_SIZE=${BATCH_SIZE:-8}
SIGNAL_AT_STEP=${SIGNAL_AT_STEP:-300}
FINISH_TIMEOUT=${FINISH_TIMEOUT:-360}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
PYTHON=${PYTHON:-python}
mkdir -p "$LAB"
# Small batches so the run lasts long enough to be interrupted; metrics every step, flushed often, so that
# metrics.csv shows how far training got and where the requeued run started.
ARGS=(--trainer.max_epochs="$EPOCHS" --data.batch_size="$BATCH_SIZE" --trainer.log_every_n_steps=1
      --trainer.logger.init_args.flush_logs_every_n_steps=5 "$@")

log() { echo "[$(date +%T)] $*"; }
JOBS=()
cleanup() { for j in "${JOBS[@]}"; do scancel "$j" 2>/dev/null || true; done; }
trap cleanup EXIT

job_field() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
max_step() {  # largest `step` in a CSVLogger metrics.csv (0 if none yet)
    "$PYTHON" - "$1" <<'EOF'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
    print(max((int(float(r["step"])) for r in rows if r.get("step")), default=0))
except (OSError, KeyError, ValueError):
    print(0)
EOF
}
submit() {  # submit NAME RUN_DIR -> job id
    RUN_DIR="$2" CONFIG="$CONFIG" sbatch --parsable --job-name="$1" --output="$LAB/$1-%j.out" \
        examples/slurm/train_cpu.sbatch "${ARGS[@]}"
}

command -v sbatch >/dev/null && sinfo -h >/dev/null 2>&1 || { echo "no SLURM cluster answers (setup_one_node_cluster.sh?)"; exit 2; }
log "lab folder: $LAB   config: $CONFIG   extra args: ${ARGS[*]}"

# ---------------------------------------------------------------- 1. the run to interrupt
T0=$(date +%s)
A=$(submit requeue-check "$LAB/interrupted") || { echo "sbatch failed"; exit 2; }
JOBS+=("$A")
log "submitted job $A (to be interrupted)"
CSV0="$LAB/interrupted/lightning_logs/version_0/metrics.csv"
step=0
deadline=$(( $(date +%s) + 180 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    step=$(max_step "$CSV0")
    [ "$step" -ge "$SIGNAL_AT_STEP" ] && break
    state=$(job_field "$A" JobState)
    case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.5
done
if [ "$step" -lt "$SIGNAL_AT_STEP" ]; then
    log "FAIL: job $A reached step $step (state $(job_field "$A" JobState)) instead of $SIGNAL_AT_STEP; output: $LAB/requeue-check-$A.out"
    exit 1
fi

# ---------------------------------------------------------------- 2. the signal SLURM sends before the wall time
T_SIG=$(date +%s)
# Not --batch: that would signal the batch shell (which dies of it), not the srun tasks running Lightning.
scancel --signal=USR1 "$A"
log "sent SIGUSR1 to job $A at logged step $step ($(( T_SIG - T0 )) s after submission)"

# The uninterrupted reference run: queued now, it runs while the requeued job waits to become eligible again.
B=$(submit reference "$LAB/uninterrupted") || { echo "sbatch failed"; exit 2; }
JOBS+=("$B")
log "submitted job $B (uninterrupted reference, same settings)"

# ---------------------------------------------------------------- 3. wait (bounded) for the requeued run to end
deadline=$(( T_SIG + FINISH_TIMEOUT ))
restarted_at=""
ended_at=""
while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(job_field "$A" JobState); restarts=$(job_field "$A" Restarts)
    if [ -z "$restarted_at" ] && [ "${restarts:-0}" -ge 1 ] && [ "$state" = RUNNING ]; then
        restarted_at=$(date +%s); log "job $A running again (Restarts=$restarts, $(( restarted_at - T_SIG )) s after the signal)"
    fi
    case "$state" in
        COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|"")  # "" = already purged by slurmctld
            [ "${restarts:-0}" -ge 1 ] && break
            # ended without a requeue: give `scontrol requeue` a few seconds, then stop waiting
            ended_at=${ended_at:-$(date +%s)}
            [ $(( $(date +%s) - ended_at )) -ge 15 ] && { log "job $A ended ($state) without being requeued"; break; }
            ;;
        *) ended_at="" ;;
    esac
    sleep 2
done
T_END=$(date +%s)
state=$(job_field "$A" JobState); restarts=$(job_field "$A" Restarts)
log "job $A: state=$state restarts=$restarts ($(( T_END - T_SIG )) s after the signal)"
case "$state" in
    COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|"") ;;
    *) log "job $A did not finish within ${FINISH_TIMEOUT}s of the signal: cancelling it"; scancel "$A" ;;
esac

# the reference run (bounded)
deadline=$(( $(date +%s) + RUN_TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    case "$(job_field "$B" JobState)" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|"") break ;; esac
    sleep 2
done
stateB=$(job_field "$B" JobState)
log "job $B (reference): state=$stateB"
case "$stateB" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|"") ;; *) scancel "$B" ;; esac

# ---------------------------------------------------------------- 4. verdict, from the output, logs and checkpoints
"$PYTHON" - "$LAB" "$A" "$B" "$state" "$stateB" "$step" <<'EOF'
import csv, glob, os, re, sys
import torch

lab, job_a, job_b, state_a, state_b, signal_step = sys.argv[1:7]
out_a = open(f"{lab}/requeue-check-{job_a}.out", errors="replace").read()
out_b_path = f"{lab}/reference-{job_b}.out"
out_b = open(out_b_path, errors="replace").read() if os.path.exists(out_b_path) else ""
run_a, run_b = f"{lab}/interrupted", f"{lab}/uninterrupted"
results = []

def check(name, ok, detail):
    results.append(ok)
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")

def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)

def newest_version(run, name):
    paths = glob.glob(f"{run}/lightning_logs/version_*/{name}")
    return max(paths, key=lambda p: int(p.split("version_")[1].split("/")[0])) if paths else None

def csv_steps(path):
    try:
        return [int(float(r["step"])) for r in csv.DictReader(open(path)) if r.get("train_loss")]
    except OSError:
        return []

print(f"\nSummary (lab folder {lab})")
# (a) the hpc checkpoint, and where each rank was when it was written
hpc = sorted(glob.glob(f"{run_a}/hpc_ckpt_*.ckpt"))
saved_step = None
if hpc:
    ckpt = load(hpc[0])
    saved_step = ckpt["global_step"]
    ranks = ckpt.get("lightning_localsgd", {}).get("ranks", [])
    rank_steps = [r["algorithm"]["step"] for r in ranks]
    in_sync = [r["algorithm"].get("in_sync") for r in ranks]
    batch_idx = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    check("(a) hpc checkpoint written", True,
          f"{os.path.basename(hpc[0])}: global_step={saved_step} (epoch {ckpt['epoch']}, batch {batch_idx}); "
          f"per-rank algorithm steps={rank_steps} in_sync={in_sync} "
          f"({'same step on every rank' if len(set(rank_steps)) == 1 else 'RANKS SAVED AT DIFFERENT STEPS'})")
else:
    check("(a) hpc checkpoint written", False, f"no hpc_ckpt_*.ckpt in {run_a}")

# (b) the restart
restart_lines = re.findall(r"SLURM_RESTART_COUNT=(\d+)", out_a)
check("(b) restarted with SLURM_RESTART_COUNT=1", "1" in restart_lines,
      f"runs seen in the output: SLURM_RESTART_COUNT={restart_lines}, scontrol state {state_a}")

# (c) the resume point: the requeued run's first logged step
resumed_msg = re.search(r"Restoring states from the checkpoint path at (\S+)", out_a)
steps_v1 = csv_steps(f"{run_a}/lightning_logs/version_1/metrics.csv")
first = min(steps_v1) if steps_v1 else None
ok_c = bool(resumed_msg) and first is not None and saved_step is not None and saved_step - 1 <= first <= saved_step + 1
check("(c) resumed from the saved step", ok_c,
      f"restored from {resumed_msg.group(1) if resumed_msg else 'NOTHING'}; first step logged after the restart="
      f"{first}, saved global_step={saved_step}")

# (d) the end
finished = re.findall(r"`Trainer.fit` stopped: (.*)", out_a)
exit_lines = re.findall(r"srun exited with (\d+)", out_a)
last_a = newest_version(run_a, "checkpoints/last.ckpt")
lasts_a = [last_a] if last_a and "version_0/" not in last_a else []
ok_d = state_a == "COMPLETED" and bool(finished) and exit_lines[-1:] == ["0"] and bool(lasts_a)
check("(d) requeued run finished", ok_d,
      f"state {state_a}; srun exits per run {exit_lines}; {finished[-1] if finished else 'no `Trainer.fit` stopped line'}")

# anything suspicious in the interrupted job's output
bad = [l for l in out_a.splitlines()
       if re.search(r"Traceback|Error|error|Exception|timed out|Timeout|hang", l) and "UserWarning" not in l]
print(f"  errors/tracebacks in the interrupted job's output: {len(bad)}")
for line in bad[:15]:
    print(f"    {line[:300]}")
sig_lines = [l for l in out_a.splitlines() if re.search(r"auto-requeue signal|requeu|SIGTERM", l)]
for line in sig_lines[:10]:
    print(f"    log: {line[:200]}")

# (e) weights: requeued vs uninterrupted
last_b = newest_version(run_b, "checkpoints/last.ckpt")
lasts_b = [last_b] if last_b else []
if lasts_a and lasts_b:
    ca, cb = load(lasts_a[-1]), load(lasts_b[-1])
    sa, sb = ca["state_dict"], cb["state_dict"]
    diff = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    norm = max(sb[k].float().abs().max().item() for k in sb)
    same = all(torch.equal(sa[k], sb[k]) for k in sa)
    check("(e) final weights identical to the uninterrupted run", same,
          f"reference job {job_b} ({state_b}); max |diff|={diff:.3g} (max |w|={norm:.3g}); "
          f"final global_step {ca['global_step']} vs {cb['global_step']}; saved at step {saved_step}")
else:
    check("(e) final weights identical to the uninterrupted run", False,
          f"not compared: last.ckpt requeued={lasts_a}, uninterrupted={lasts_b}, reference state {state_b}")

print(f"\n{'PASS' if all(results) else 'FAIL'}: {sum(results)}/{len(results)} checks passed "
      f"(SIGUSR1 sent at logged step {signal_step})")
sys.exit(0 if all(results) else 1)
EOF
status=$?
log "outputs: $LAB/requeue-check-$A.out  $LAB/reference-$B.out"
exit $status
