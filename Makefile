# Two commands for a newcomer: `make book` (the main job) and `make test`.
# Each does its own idempotent setup: venv + pinned pip packages, the Debian Fashion-MNIST
# package, the widget JavaScript from npm, and (for tests) Debian's Chromium.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup book test lint bench clean apt-update data chromium

setup: $(VENV)/.installed node_modules/.installed data

$(VENV)/.installed: requirements.txt pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

apt-update:
	@[ -f /tmp/.spade-apt-updated ] || { $(SUDO) apt-get update -qq && touch /tmp/.spade-apt-updated; }

data:
	@if [ -z "$$SPADE_DATA_DIR" ] && [ ! -f $(FMNIST) ]; then \
	  $(MAKE) apt-update && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi

chromium:
	@command -v chromium >/dev/null || { $(MAKE) apt-update && \
	  $(SUDO) apt-get install -y -qq chromium; }

# The book's numbers are computed under pinned numerical settings (AVX2 kernels, 2 threads;
# spade_lib/reproducibility.py), so they do not depend on this machine's processor.
book: setup
	$(BIN)/python -m spade_lib.reproducibility $(BIN)/jupyter-book build book/
	@echo "The book is in book/_build/html/index.html"

lint: setup
	$(BIN)/ruff check .

test: setup chromium lint
	SPADE_PRESET=smoke $(BIN)/pytest tests/ --nbval-lax --nbval-current-env book/

bench: setup
	$(BIN)/python benchmarks/bench_trace.py --samples 2
	$(BIN)/python benchmarks/bench_trace.py --samples 2 --sparsity preset:cpu
	$(BIN)/python benchmarks/bench_solver.py --batch 2

clean:
	rm -rf book/_build .cache
