"""The reward model scores what the policy produced: a response cut at max_new_tokens is scored
without the turn's closing text or EOS that a finished response gets."""

from __future__ import annotations

from rlhf_cli.scoring import RewardScorer


def test_a_response_cut_at_max_new_tokens_is_scored_as_cut(rm_final):
    """A response that never emitted a stop token is scored as the policy left it: without the
    text that closes the turn (chat) or the EOS (plain text), which a finished one gets."""
    scorer = RewardScorer.load(rm_final, "cpu", "none")
    tokenizer = scorer.tokenizer
    closing = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for prompt in ([{"role": "user", "content": "What is the colour of two sky?"}],
                   "What is the colour of two sky?"):  # fmt: skip
        finished = scorer.encode(prompt, "Answer: two blue").input_ids
        cut = scorer.encode(prompt, "Answer: two blue", ended=False).input_ids
        ending = closing if isinstance(prompt, list) else [tokenizer.eos_token_id]
        assert finished[-len(ending) :] == ending and finished[: -len(ending)] == cut
        scores = scorer.score([prompt, prompt], ["Answer: two blue"] * 2, ended=[True, False])
        assert scores[0] != scores[1]
