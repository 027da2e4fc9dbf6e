"""`dpo.precompute_reference=true` keeps the reference log-probs in output_dir: a later run in the
same folder reads them only when they were computed for the same reference (base and init_from),
the same data and the same tokenization (max_length); otherwise it computes them again."""

from __future__ import annotations

import pytest

from rlhf_cli.tracking import read_metrics

from conftest import run_cli
from tiny import preference_rows, write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-prefs")
    return write_jsonl(folder / "train.jsonl", preference_rows(24, 0))


def dpo(out, data, *extra) -> tuple[str, list[float]]:
    args = ["dpo", f"data={data}", "data.eval_size=4", f"output_dir={out}", "optim.lr=5e-3",
            "train.max_steps=2", "train.eval_every=0", "dpo.precompute_reference=true",
            "overwrite=true", *extra]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return " ".join(result.stdout.split()), [m["loss"] for m in read_metrics(out) if "loss" in m]


def test_the_reference_cache_is_reused_only_for_its_reference_and_data(
    tmp_path, tiny_model, sft_final, pairs
):
    out = tmp_path / "dpo"
    adapter = [f"init_from={sft_final}"]
    said, _ = dpo(out, pairs, *adapter)
    assert "(saved in" in said
    said, first = dpo(out, pairs, *adapter)
    assert "(read from" in said
    # the same rows, the same count, another tokenization; then another reference (the bare base)
    changes = ([*adapter, "data.max_length=12"], [f"model.name_or_path={tiny_model}"])
    for n, change in enumerate(changes):
        said, losses = dpo(out, pairs, *change)
        assert "computed again, the cached ones being for another reference or data" in said, change
        # exact by construction: a fresh folder runs the same computation in the same process kind
        _, fresh = dpo(tmp_path / f"fresh-{n}", pairs, *change)
        assert losses == fresh and losses != first, change
