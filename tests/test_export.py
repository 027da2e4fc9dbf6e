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
    assert torch.allclose(theirs + bias, ours, rtol=0, atol=1e-4 * max(ours.abs().max(), 1.0))
    assert ours.std() > 1e-3  # the head gives different rows different scores


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
