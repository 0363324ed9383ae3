# The README's commands. Each one prepares .venv first (scripts/setup_env.sh).
PYTHON := .venv/bin/python

.PHONY: env test bench bench-pytest lint gpu-check

env:
	bash scripts/setup_env.sh

# The test suite (what CI runs).
test: env
	$(PYTHON) -m pytest tests -q

# The main job: ResNet-50 and Res2Net-50 against PyTorch on the default device.
bench: env
	$(PYTHON) -m fastres bench

bench-pytest: env
	$(PYTHON) -m pytest bench/ --benchmark-only

lint: env
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

gpu-check:
	bash scripts/gpu_check.sh
