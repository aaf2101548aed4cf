# Everything a fresh machine needs, in two commands: `make demo` and `make test`.
PYTHON ?= python3
# torch only when missing, and then the CPU build pinned here; a user's own torch is never replaced.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-lightning-min lint bench bench-smoke gpu-check

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m lightning_localsgd.demos.compare

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

# The lowest Lightning that pyproject declares, installed beside the main one (never over it) and put first on
# PYTHONPATH for a short part of the suite: resume (Trainer, Fabric, plain PyTorch, SLURM requeue, torchrun restart,
# replica groups), configuration, checkpoints. Its dependencies are the main install's. About 3 minutes on 2 cores. Another version:
# `make test-lightning-min LIGHTNING_MIN=2.5.6 LIGHTNING_MIN_DIR=/tmp/lightning-2.5.6`.
LIGHTNING_MIN ?= 2.4.0
LIGHTNING_MIN_DIR ?= .lightning-min
WITH_LIGHTNING_MIN = PYTHONPATH="$(abspath $(LIGHTNING_MIN_DIR))$${PYTHONPATH:+:$$PYTHONPATH}" \
	LOCALSGD_EXPECT_LIGHTNING=$(LIGHTNING_MIN)
test-lightning-min: install
	test -f $(LIGHTNING_MIN_DIR)/lightning-$(LIGHTNING_MIN).dist-info/METADATA || { rm -rf $(LIGHTNING_MIN_DIR) && \
		$(PYTHON) -m pip install -q --no-deps --target $(LIGHTNING_MIN_DIR) "lightning==$(LIGHTNING_MIN)"; }
	$(WITH_LIGHTNING_MIN) $(PYTHON) -c "import lightning as L, sys; print('lightning', L.__version__, L.__file__); \
		sys.exit(L.__version__ != '$(LIGHTNING_MIN)')"
	$(WITH_LIGHTNING_MIN) $(PYTHON) -m pytest -q tests/test_lightning_compat.py tests/test_strategy_config.py \
		tests/test_round_checkpoint.py tests/test_checkpoint_shards.py
	$(WITH_LIGHTNING_MIN) $(PYTHON) -m pytest -q tests/test_lightning_e2e.py tests/test_entry_points_e2e.py \
		tests/test_faults_e2e.py tests/test_sharded_groups_e2e.py tests/test_fabric_sharded_e2e.py \
		-k "resume or requeue or torchrun"

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# The slow-link lab (benchmarks/slow_link.py): needs root for the network namespaces, else it runs on loopback
# and says so. One configuration at a time; about 40 minutes on 2 cores. Results land in results/.
BENCH = $(PYTHON) -m benchmarks.slow_link
bench: install
	$(BENCH) --workload mlp --link 200mbit
	$(BENCH) --workload cnn --link 200mbit
	$(BENCH) --workload lm --link 200mbit
	$(BENCH) --workload mlp --link 100mbit
	$(BENCH) --workload mlp --link 1gbit
	$(BENCH) --workload mlp --link 10gbit
	$(PYTHON) -m benchmarks.scaling --workload mlp
	$(PYTHON) -m benchmarks.overlap_sweep --link 200mbit --periods 32 64 128 256

# 30 to 60 seconds on 2 cores (loopback, a few steps of one peer of each kind): for CI.
bench-smoke: install
	$(BENCH) --smoke

# The device check (benchmarks/gpu_check.py): every strategy through Trainer.fit on CUDA (NCCL in one process, two
# processes on the GPU(s)), one table and results/gpu_check/gpu_check.json, sized for 8 minutes on one GPU. Without a
# GPU it runs on the CPU (about 30 seconds on 2 cores).
gpu-check: install
	$(PYTHON) -m benchmarks.gpu_check
