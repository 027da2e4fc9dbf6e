# Rounds of feedback, as the pipeline is meant to be run: collect -> train -> evaluate -> collect
# again. Each round samples candidates from the previous round's policy, has a judge label them
# (binary good/bad for KTO, or pairwise for DPO), trains from that policy on its own labels, and
# evaluates the result on held-out prompts. Copy this file and set the variables for your task:
#
#   make -f examples/iterate.mk START=runs/sft/final PROMPTS=prompts.jsonl JUDGE=my_judges:correct
#   make -f examples/iterate.mk METHOD=dpo ROUNDS=2 OUT=runs/iterate-dpo
#   make iterate                 # from this repository: 3 KTO rounds on the demo task
#
# Every file is a make target: the same command after an interruption re-runs only what is missing
# (and each stage resumes from its own checkpoints); `rm -r $(OUT)/round-3` redoes one round.
RLHF ?= rlhf
ROUNDS ?= 3
# kto: each response labelled good or bad | dpo: pairs of responses ranked
METHOD ?= kto
# the policy round 1 samples from and starts from
START ?= runs/demo/sft/final
OUT ?= runs/iterate
# the prompts sampled and labelled each round (a shipped set's train split, or your file)
PROMPTS ?= demo-prompts
# package.module:function(prompts, responses, *columns) -> one score per response
JUDGE ?= rlhf_cli.judges:demo_gold
# candidates per prompt
N ?= 4
SAMPLE_ARGS ?= generation.max_new_tokens=32 temperature=1.0
# e.g. threshold=0.5 (binary: good when the judge's score is >= it)
LABEL_ARGS ?=
# the demo's training settings (KTO: the rarer kind of label weighed up to balance the other, as the
# share of good responses changes from round to round); yours: optim.lr=... train.max_steps=...
TRAIN_ARGS ?= config=demo-$(METHOD) $(if $(filter kto,$(METHOD)),kto.balance=true)
# the held-out prompts and the judge that scores them
EVAL_ARGS ?= config=demo-eval
# the table of rounds: this repository's scripts/compare_evals.py (a copy elsewhere: give its path)
COMPARE ?= python $(dir $(abspath $(lastword $(MAKEFILE_LIST))))../scripts/compare_evals.py

MODE := $(if $(filter kto,$(METHOD)),binary,pairwise)
ROUND_NUMBERS := $(shell seq 1 $(ROUNDS))
policy = $(if $(filter 0,$1),$(START),$(OUT)/round-$1/policy/final)
previous = $(call policy,$(shell expr $1 - 1))

.PHONY: all
all: $(OUT)/rounds.json

# the table: gold per round (the start's too), each round's gain over the round before
$(OUT)/rounds.json: $(OUT)/round-0/eval/eval.json $(foreach r,$(ROUND_NUMBERS),$(OUT)/round-$(r)/eval/eval.json)
	$(COMPARE) $(foreach r,0 $(ROUND_NUMBERS),round-$(r)=$(OUT)/round-$(r)/eval) --json $@

$(OUT)/round-0/eval/eval.json:
	$(RLHF) eval $(EVAL_ARGS) policy=$(START) output_dir=$(OUT)/round-0/eval overwrite=true

define ROUND
$(OUT)/round-$(1)/samples.jsonl: $(OUT)/round-$(shell expr $(1) - 1)/eval/eval.json
	$(RLHF) sample policy=$(call previous,$(1)) data=$(PROMPTS) n=$(N) seed=$(1) $(SAMPLE_ARGS) \
		out=$$@ output_dir=$(OUT)/round-$(1)/sample overwrite=true

$(OUT)/round-$(1)/feedback.jsonl: $(OUT)/round-$(1)/samples.jsonl
	$(RLHF) label mode=$(MODE) in=$$< out=$$@ judge=$(JUDGE) $(LABEL_ARGS)
	$(RLHF) label --stats out=$$@

$(OUT)/round-$(1)/policy/final/rlhf_stage.json: $(OUT)/round-$(1)/feedback.jsonl
	$(RLHF) $(METHOD) $(TRAIN_ARGS) init_from=$(call previous,$(1)) data=$$< \
		output_dir=$(OUT)/round-$(1)/policy

$(OUT)/round-$(1)/eval/eval.json: $(OUT)/round-$(1)/policy/final/rlhf_stage.json
	$(RLHF) eval $(EVAL_ARGS) policy=$(OUT)/round-$(1)/policy/final \
		compare=$(OUT)/round-$(shell expr $(1) - 1)/eval output_dir=$(OUT)/round-$(1)/eval overwrite=true
endef
$(foreach r,$(ROUND_NUMBERS),$(eval $(call ROUND,$(r))))
