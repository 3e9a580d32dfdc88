# The two commands of the README's quickstart, and what CI runs.
PYTHON ?= python3
# torch first, pinned: its CPU wheel. An open range would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev,examples]"

demo: install
	$(PYTHON) -m bntool demo bntool-demo --force  # replaces the files of an earlier `make demo`

test: install
	$(PYTHON) -m pytest -p no:cacheprovider tests

lint:
	$(PYTHON) -m ruff check bntool tests benchmarks examples

bench:
	$(PYTHON) benchmarks/run_all.py
	$(PYTHON) benchmarks/update_readme.py
