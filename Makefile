# Two commands on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prefixkit-installed

.PHONY: setup test check demo bench clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; letting the
# resolver choose would pull a several-GB CUDA build.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt $(wildcard runtime/csrc/*)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[train,serve,eval,test]'
	$(BIN)/python -m prefixkit.runtime.kernels  # prefixkit's CPU kernels, compiled once at install
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The fast tier: everything but the README runner, servers and other processes, learning runs
# and the real model (a few minutes); `make test` is the whole suite, as CI runs it.
check: setup
	$(BIN)/python -m pytest -m "not slow and not real_model"

demo: setup
	$(BIN)/python examples/demo.py

# Latency and throughput against Hugging Face generate and PEFT (several minutes).
bench: setup
	$(BIN)/pip install -c constraints.txt -e '.[train,serve,eval,test,bench]'
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) build *.egg-info
