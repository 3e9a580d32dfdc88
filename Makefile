# The two commands of the README's quickstart, and what CI runs (.ci/run: lint, the fast tier, the slow tier).
PYTHON ?= python3
# torch first, pinned: its CPU wheel. An open range would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The torchvision release made for that torch, pinned for the same reason (timm, a test extra, needs it). PyPI's
# wheel is built for CUDA torch; bntool imports its model definitions on a CPU torch all the same (bntool/arch.py).
TORCHVISION ?= torchvision==0.28.0

.PHONY: install demo test test-slow test-all lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)" "$(TORCHVISION)" -e ".[dev,examples,timm]"

demo: install
	$(PYTHON) -m bntool demo bntool-demo --force  # replaces the files of an earlier `make demo`

# The fast tier: everything but the end-to-end cases marked `slow` (subprocesses, signals, torchrun).
test: install
	$(PYTHON) -m pytest -p no:cacheprovider -m "not slow" tests

test-slow: install
	$(PYTHON) -m pytest -p no:cacheprovider -m slow tests

test-all: install
	$(PYTHON) -m pytest -p no:cacheprovider tests

lint:
	$(PYTHON) -m ruff check bntool tests benchmarks examples
	$(PYTHON) -m mypy bntool

bench:
	$(PYTHON) benchmarks/run_all.py
	$(PYTHON) benchmarks/update_readme.py
