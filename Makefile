# Everything a fresh machine needs, in two commands: `make demo` and `make test`.
PYTHON ?= python3
# torch only when missing, and then the CPU build pinned here; a user's own torch is never replaced.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench bench-smoke

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m lightning_localsgd.demos.compare

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

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

# Seconds, loopback, a few steps of one peer of each kind: for CI.
bench-smoke: install
	$(BENCH) --smoke
