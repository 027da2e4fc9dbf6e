"""CUDA paths (nf4 with bf16 compute, bf16 autocast): run where a GPU is present, skipped elsewhere.

No GPU was available when these were written; they are the first thing to run on a GPU machine."""

import json

import pytest
import torch

from rlhf_cli.tracking import read_metrics

from conftest import run_cli, tiny_sft_args
from tiny import preference_rows, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)"),
]


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
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # bf16 compute: ln 2 up to rounding
