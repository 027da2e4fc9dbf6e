"""CUDA paths (nf4 with bf16 compute, bf16 autocast): run where a GPU is present, skipped elsewhere.

No GPU was available when these were written; they are the first thing to run on a GPU machine."""

import json
import math

import pytest
import torch

from rlhf_cli.tracking import read_metrics

from conftest import run_cli, tiny_sft_args
from numerics import EPS32, reordered_sum
from tiny import make_tokenizer, preference_rows, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)"),
]

BETA = 0.1  # dpo.beta as configs/dpo.yaml ships it
PAIRS_PER_STEP = 8  # train.batch_size for dpo in TEST_SIZES, one micro-batch
MAX_LENGTH = 256  # data.max_length for dpo in TEST_SIZES: no row has more target tokens


def test_sft_then_dpo_on_cuda_with_a_4bit_base(tmp_path, tiny_model, chat16):
    sft = tmp_path / "sft"
    result = run_cli(
        *tiny_sft_args(tiny_model, chat16, sft, "device=cuda", "train.max_steps=4"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((sft / "final" / "rlhf_stage.json").read_text())
    assert (
        manifest["config"]["quant"]["mode"] == "auto" and "quant=nf4" in result.stdout
    )  # auto = nf4 on CUDA
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, 0))
    out = tmp_path / "dpo"
    result = run_cli("dpo", f"init_from={sft / 'final'}", f"data={prefs}", "data.eval_size=8", f"output_dir={out}",
                     "device=cuda", "train.max_steps=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first = [m for m in read_metrics(out) if "loss" in m][0]
    assert 0 < first["perf/peak_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    # policy == reference before the first update (init_from's adapter twice, on the one 4-bit
    # base): both passes run the same bf16 kernels on the same batch, so bf16 rounding is the same
    # in both; what may differ is the order of each row's float32 sum of its target log-probs
    # (index_add uses atomics on CUDA): within reordered_sum(MAX_LENGTH, |sum|), all terms of one
    # sign, so over the step's pairs the mean error is that of the logged mean |logps|
    chosen, rejected = abs(first["logps/chosen"]), abs(first["logps/rejected"])
    assert abs(first["rewards/chosen"]) <= BETA * reordered_sum(MAX_LENGTH, chosen)
    assert abs(first["rewards/rejected"]) <= BETA * reordered_sum(MAX_LENGTH, rejected)
    # the loss, mean of -logsigmoid(beta h): ln 2 at h = 0, slope beta / 2 in h, h = (policy -
    # reference) on the chosen row - the same on the rejected one; + float32 -logsigmoid(0) (an
    # ulp) and the mean over the step's pairs. ~1e-4 here; the base without the SFT adapter as the
    # reference would be off by > 1e-2
    moved = BETA / 2 * reordered_sum(MAX_LENGTH, chosen + rejected)
    rounding = EPS32 * math.log(2) + reordered_sum(PAIRS_PER_STEP, math.log(2))
    assert first["loss"] == pytest.approx(math.log(2), abs=moved + rounding)


def wide_model(folder):
    """A Llama of 8 layers, hidden 1024 (75M parameters in its linear layers) in bf16: big enough
    that its weights, not the CUDA workspaces, decide the difference between two runs' peaks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    linear = [
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    ]
    others = sum(p.numel() for p in model.parameters()) - sum(linear)
    return folder, sum(linear), max(linear), others


def test_a_4bit_base_saves_what_its_parameter_count_says(tmp_path, chat16):
    """The same one-step SFT on a wider model, nf4 against an unquantized bf16 base: the peak GPU
    memory (torch.cuda.max_memory_allocated) differs by at least what the base's linear layers
    take in bf16 (2 bytes a weight) less what they take in NF4 (half a byte, + 1/32 for the double-
    quantized block scales), minus what the nf4 run holds more: its embeddings, head and norms
    upcast to float32 (prepare_model_for_kbit_training: 2 bytes more each) and a few transient
    bf16 copies of its largest layer (each weight dequantized for its matmul, in the forward and
    the backward pass, and once while loading). The rest of the two runs (LoRA adapters, Adam,
    activations, CUDA workspaces) is the same."""
    model, linear, largest, others = wide_model(tmp_path / "wide")
    peaks = {}
    for quant in ("nf4", "none"):
        out = tmp_path / quant
        args = tiny_sft_args(
            model, chat16, out, "device=cuda", f"quant={quant}", "train.max_steps=1"
        )
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        (step,) = [m for m in read_metrics(out) if "loss" in m]  # step 1: the peak so far
        peaks[quant] = step["perf/peak_mem_gib"] * 2**30
    saved = linear * (2 - 0.5 - 1 / 32) - others * 2 - 4 * largest * 2  # ~93 MB of ~111 MB
    assert peaks["none"] - peaks["nf4"] >= saved, (peaks, saved)
