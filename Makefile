# Everything a fresh machine needs, in two commands: `make demo` and `make test`.
PYTHON ?= python3
# torch only when missing, and then the CPU build pinned here; a user's own torch is never replaced.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench-step

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
