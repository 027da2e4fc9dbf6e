import json

import pytest
import torch

from rlhf_cli import chat, data, modeling
from rlhf_cli.data import IGNORE_INDEX
from rlhf_cli.schema import UserError

from conftest import data_config, model_config


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return modeling.load_tokenizer(model_config(str(tiny_model)))


def _targets(tokenizer, ids, labels):
    return tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )


def test_pad_token_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_mask_covers_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "What is the colour of the sky?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and grass?"},
        {"role": "assistant", "content": "green"},
    ]
    ids, labels = data.tokenize_sft_row(
        {"messages": messages}, "messages", tokenizer, data_config(), "row"
    )
    # the rendered text is exactly the chat template's; the targets are the two assistant replies with
    # their end-of-turn token (what the model must learn to emit to stop) and the template's newline
    assert tokenizer.decode(ids) == chat.render(tokenizer, messages)
    assert _targets(tokenizer, ids, labels) == "blue<|im_end|>\ngreen<|im_end|>\n"
    # every target token is inside an assistant turn: nothing of the user/system turns is trained
    text = tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    )
    assert "blue" not in text and "green" not in text and "sky" in text


def test_prompt_completion_mask_and_eos(tokenizer):
    row = {"prompt": "What is the colour of the sky? ", "completion": "blue"}
    ids, labels = data.tokenize_sft_row(row, "prompt_completion", tokenizer, data_config(), "row")
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    # byte-level BPE merges the prompt's trailing space into " blue": a token that overlaps the
    # completion is a target, so the first completion word is never lost
    assert _targets(tokenizer, ids, labels) == " blue<|im_end|>"
    prompt_part = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt_part) == "What is the colour of the sky?"
    assert labels.index(IGNORE_INDEX) == 0 and IGNORE_INDEX not in labels[len(prompt_part) :]


def test_conversational_prompt_completion(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "say hello"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    }
    ids, labels = data.tokenize_sft_row(row, "prompt_completion", tokenizer, data_config(), "row")
    assert _targets(tokenizer, ids, labels) == "hello<|im_end|>\n"


def test_truncation_and_drop_counts(tokenizer):
    rows = [
        {"prompt": "one two three four five six seven eight nine " * 3, "completion": "yes"},
        {"prompt": "hi ", "completion": "no"},
    ]
    cfg = data_config(max_length=10, truncation="drop")
    examples, stats = data.tokenize_sft(rows, tokenizer, cfg, "src")
    assert (stats.kept, stats.dropped_too_long) == (1, 1)
    cfg = data_config(max_length=10, truncation="truncate")
    examples, stats = data.tokenize_sft(rows, tokenizer, cfg, "src")
    # the long row loses its completion to truncation, so it has no target left and is dropped
    assert (stats.kept, stats.truncated, stats.dropped_no_target) == (1, 1, 1)
    assert all(len(e) <= 10 for e in examples)


def test_column_remapping(tokenizer):
    cfg = data_config()
    cfg.columns.prompt, cfg.columns.completion = "question", "answer"
    examples, _ = data.tokenize_sft([{"question": "q ", "answer": "a"}], tokenizer, cfg, "src")
    assert len(examples) == 1


@pytest.mark.numerics
def test_packing_has_no_cross_example_attention(tiny_model, tokenizer):
    """Logits of packed rows equal those of each example run alone (in float64, where the two
    passes' different matmul and attention shapes round ~1e-13 apart)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval().to(torch.float64)
    rows = [
        {"prompt": f"What is the colour of the {w}? ", "completion": f"Answer: {c}"}
        for w, c in [
            ("sky", "blue"),
            ("grass", "green"),
            ("dog", "red"),
            ("cat", "yellow"),
            ("bird", "blue"),
        ]
    ]
    examples, _ = data.tokenize_sft(rows, tokenizer, data_config(), "src")
    packed = data.pack(examples, max_length=40)
    assert 1 < len(packed) < len(examples)
    batch = data.collate(packed, tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        cursor = {}
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            row = next(
                i
                for i, p in enumerate(packed)
                if _contains(p.input_ids, ex.input_ids, cursor.get(i, 0))
            )
            start = _find(packed[row].input_ids, ex.input_ids, cursor.get(row, 0))
            cursor[row] = start + len(ex)
            # float64 sums of <= 128 terms |x| < 10 through 2 layers round ~1e-13 apart (float32's
            # 1e-5 has no short bound); attention across examples moves these logits by ~10
            torch.testing.assert_close(
                packed_logits[row, start : start + len(ex)], alone, rtol=0, atol=1e-6
            )
    # the first token of each example is never a target (no prediction across examples)
    for row in packed:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == IGNORE_INDEX for i in starts)


def _find(haystack, needle, start):
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _contains(haystack, needle, start):
    return _find(haystack, needle, start) >= 0


def test_collate_pads_right_with_masks(tokenizer):
    examples = [data.Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), data.Example([8], [8])]
    batch = data.collate(examples, tokenizer.pad_token_id, packed=False)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7],
        [8, tokenizer.pad_token_id, tokenizer.pad_token_id],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [8, IGNORE_INDEX, IGNORE_INDEX]


def test_invalid_json_line_is_reported_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json}\n")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        data.load_rows(str(path))


def test_missing_columns_name_what_exists(tokenizer):
    with pytest.raises(UserError, match=r"has columns \['text'\]"):
        data.tokenize_sft([{"text": "x"}], tokenizer, data_config(), "src")


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert data.epoch_order(10, 1, 0) == data.epoch_order(10, 1, 0)
    assert data.epoch_order(10, 1, 0) != data.epoch_order(10, 1, 1)
    assert sorted(data.epoch_order(10, 1, 3)) == list(range(10))


def test_shipped_demo_data_loads_with_its_own_eval_split():
    train, held_out = data.load_splits(data_config(path="demo-sft"), seed=0)
    assert len(train) > 100 and len(held_out) > 10
    questions = {r["messages"][0]["content"] for r in train}
    assert not questions & {r["messages"][0]["content"] for r in held_out}


def test_eos_is_a_target_even_when_the_tokenizer_appends_it(tokenizer):
    from tokenizers import processors

    appending = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()))  # fmt: skip
    appending.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|im_end|>", special_tokens=[("<|im_end|>", tokenizer.eos_token_id)]
    )
    appending.eos_token, appending.pad_token = tokenizer.eos_token, tokenizer.pad_token
    ids, labels = data.tokenize_prompt_completion(appending, "say hello ", "hello", "row")
    assert ids[-1] == appending.eos_token_id and ids.count(appending.eos_token_id) == 1
    assert labels[-1] == appending.eos_token_id


def test_held_out_split_options_that_would_leak_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    with pytest.raises(UserError, match="names a hub split"):
        data.load_splits(data_config(path=str(path), eval_split="test"), seed=0)
    with pytest.raises(UserError, match="would train on demo-sft's held-out rows"):
        data.load_splits(data_config(path="demo-sft", split="eval"), seed=0)
    with pytest.raises(UserError, match="is a folder"):
        data.load_rows(str(tmp_path))


def test_preference_pairs_explicit_and_implicit_prompt(tokenizer):
    rows = [
        {"prompt": "q ", "chosen": "yes", "rejected": "no", "margin": 1.5},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
    ]  # fmt: skip
    pairs, stats = data.tokenize_preferences(rows[:1], tokenizer, data_config(), "src")
    assert (  # the margin is the row's own float, passed through: exact
        pairs[0].margin == 1.5
        and _targets(tokenizer, pairs[0].chosen.input_ids, pairs[0].chosen.labels)
        == " yes<|im_end|>"
    )
    pairs, _ = data.tokenize_preferences(rows[1:], tokenizer, data_config(), "src")
    assert (
        _targets(tokenizer, pairs[0].rejected.input_ids, pairs[0].rejected.labels)
        == "no<|im_end|>\n"
    )
    batch = data.collate_pairs(pairs * 3, tokenizer.pad_token_id)
    # exact: rows without a margin get 0.0
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="`margin` must be a finite number"):
        data.tokenize_preferences([{**rows[0], "margin": "big"}], tokenizer, data_config(), "src")
    with pytest.raises(UserError, match="missing column"):
        data.tokenize_preferences([{"prompt": "q", "chosen": "a"}], tokenizer, data_config(), "src")


def test_shared_prefix_rows_hold_each_sequence_once_with_its_own_positions():
    """collate_shared_prefix: prefix + chosen rest + rejected rest per row; reading the prefix and
    one continuation back gives that whole sequence with positions 0..n-1, and `last` points at
    its last token. A sequence that is a prefix of the other keeps its last token as its own."""
    from rlhf_cli.data import CHOSEN, PAD, PREFIX, REJECTED, Example, PairExample

    def pair(chosen, rejected):
        return PairExample(Example(chosen, chosen), Example(rejected, rejected))

    pairs = [
        pair([1, 2, 3, 4], [1, 2, 5]),
        pair([7, 8], [7, 8, 9]),
        pair([3], [4, 5]),
        pair([6, 6], [6, 6]),
    ]
    batch = data.collate_shared_prefix(pairs, pad_token_id=0)
    assert [data.shared_prefix_length(p.chosen.input_ids, p.rejected.input_ids) for p in pairs] == [
        2,
        1,
        0,
        1,
    ]
    for i, p in enumerate(pairs):
        segments, ids, positions = (batch[k][i] for k in ("segments", "input_ids", "position_ids"))
        for side, sequence, last in (
            (CHOSEN, p.chosen.input_ids, 0),
            (REJECTED, p.rejected.input_ids, 1),
        ):
            keep = (segments == PREFIX) | (segments == side)
            assert ids[keep].tolist() == sequence
            assert positions[keep].tolist() == list(range(len(sequence)))
            assert ids[batch["last"][i, last]] == sequence[-1]
            assert segments[batch["last"][i, last]] == side
        assert ids[segments == PAD].tolist() == [0] * int((segments == PAD).sum())
    assert batch["input_ids"].shape == (4, 5)  # the longest row: 2 + 2 + 1


def test_demo_data_generator_reproduces_the_shipped_files(tmp_path):
    """The shipped demo datasets are exactly what scripts/make_demo_data.py writes (no hand edits),
    and its variant flags change only the SFT train demonstrations."""
    import subprocess
    import sys

    from conftest import REPO

    script = REPO / "scripts" / "make_demo_data.py"
    shipped = REPO / "rlhf_cli" / "datasets"
    subprocess.run(
        [sys.executable, script, "--out-dir", tmp_path / "d"], check=True, capture_output=True
    )
    names = [
        f"{d}/{s}.jsonl"
        for d in ("demo-sft", "demo-prompts", "demo-prefs", "demo-tools-sft", "demo-tools")
        for s in ("train", "eval")
    ]
    for name in names:
        assert (tmp_path / "d" / name).read_bytes() == (shipped / name).read_bytes(), name
    # shipped: 45% of the SFT train demonstrations add an explanation after the answer
    rows = [json.loads(line) for line in (shipped / "demo-sft/train.jsonl").open()]
    imperfect = [r for r in rows if not r["ideal"]]
    assert len(imperfect) == round(len(rows) * 0.45)
    assert all(
        r["messages"][1]["content"].startswith(f"Answer: {r['answer']}. ") for r in imperfect
    )
    assert all(r["messages"][1]["content"] == f"Answer: {r['answer']}" for r in rows if r["ideal"])
    subprocess.run([sys.executable, script, "--out-dir", tmp_path / "v", "--imperfect-fraction", "0.2",
                    "--imperfect-style", "mixed"], check=True, capture_output=True)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "v" / "demo-sft/train.jsonl").open()]
    imperfect = [r for r in rows if not r["ideal"]]
    assert len(imperfect) == round(len(rows) * 0.2)
    assert all(r["messages"][1]["content"] != f"Answer: {r['answer']}" for r in imperfect)
    assert any(not r["messages"][1]["content"].startswith("Answer:") for r in imperfect)
    for name in names[1:]:
        assert (tmp_path / "v" / name).read_bytes() == (shipped / name).read_bytes(), name


def test_length_grouped_epochs_batch_similar_lengths(monkeypatch):
    lengths = [
        int(x) for x in torch.randint(5, 500, (203,), generator=torch.Generator().manual_seed(0))
    ]
    batch = 8
    order = data.epoch_order(203, 1, 0, lengths, batch)
    assert sorted(order) == list(range(203))  # a permutation of the items
    assert order == data.epoch_order(203, 1, 0, lengths, batch)  # a pure function (resume)
    assert order != data.epoch_order(203, 1, 1, lengths, batch)
    # the incomplete last batch holds the last 3 items of the plain shuffle
    assert order[200:] == data.epoch_order(203, 1, 0)[200:]

    def padding(order: list[int]) -> float:
        batches = [order[i : i + batch] for i in range(0, 200, batch)]
        slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / slots

    assert padding(order) < 0.1 < 0.3 < padding(data.epoch_order(203, 1, 0))
    # batches come in a shuffled order, not sorted by length
    firsts = [lengths[order[i]] for i in range(0, 200, batch)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # groups of GROUP_BATCHES batches are sorted apart: with 2 batches per group, a batch's items
    # all come from one group of the plain shuffle
    plain = data.epoch_order(40, 3, 0)
    groups = {frozenset(plain[i : i + 8]) for i in range(0, 40, 8)}
    monkeypatch.setattr(data, "GROUP_BATCHES", 2)
    stream = data.BatchStream(list(range(40)), 4, 3, lengths=list(range(40)))
    for _ in range(10):
        got = stream.next()
        assert any(set(got) <= group for group in groups)
        assert got == sorted(got)  # lengths = the item: sorted inside the batch


def test_item_length_counts_both_sides_of_a_pair():
    chosen, rejected = data.Example([1, 2, 3], [1, 2, 3]), data.Example([1, 2], [1, 2])
    assert data.item_length(chosen) == 3
    assert data.item_length(data.PairExample(chosen, rejected)) == 5
    assert data.item_length(data.PromptExample("q", [4, 5], 0)) == 2
