"""`dpo_loss` against its step-0 invariants and against TRL 1.16's own loss code.

Oracles: "sigmoid" (eps = 0), "hinge", "ipo" and "robust" are checked against the real
`trl.DPOTrainer._compute_loss`, called unbound on a stand-in trainer and model; "simpo" against the
real `trl.experimental.cpo.CPOTrainer.cpo_loss` (loss_type="simpo"), with and without label
smoothing. TRL 1.16's DPO "sigmoid" has no label smoothing, so cDPO (sigmoid with eps > 0) is
checked against the formula written out here.
"""

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.losses import DPO_LOSSES, dpo_loss

from numerics import FLOAT64_FORMULA

BETA = 0.1


def _random_pairs(batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random summed log-probs (float64) with per-pair completion lengths."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 12, (batch,), generator=g)
    rejected_lengths = torch.randint(1, 12, (batch,), generator=g)

    def logps(lengths: torch.Tensor) -> torch.Tensor:  # about -2 nats per token, with noise
        return -lengths * (2.0 + torch.rand(batch, generator=g, dtype=torch.float64))

    return {
        "policy_chosen_logps": logps(chosen_lengths),
        "policy_rejected_logps": logps(rejected_lengths),
        "reference_chosen_logps": logps(chosen_lengths),
        "reference_rejected_logps": logps(rejected_lengths),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


# ---------------------------------------------------------------------------- step-0 invariants


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("sigmoid", 0.1, math.log(2)),  # cDPO
        ("robust", 0.1, math.log(2)),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, 1 / (4 * BETA**2)),
    ],
)
def test_step0_invariants(loss_type, label_smoothing, expected):
    pairs = _random_pairs()
    pairs["reference_chosen_logps"] = pairs["policy_chosen_logps"].clone()
    pairs["reference_rejected_logps"] = pairs["policy_rejected_logps"].clone()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        **pairs, loss_type=loss_type, beta=BETA, label_smoothing=label_smoothing
    )
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (8,)
    # h = x - x is exactly 0; what is left is a few float64 roundings of log 2 or 25 (< 1e-14)
    torch.testing.assert_close(losses, torch.full_like(losses, expected), rtol=1e-9, atol=1e-9)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)  # exact: beta * 0
    assert (chosen_rewards > rejected_rewards).float().mean().item() == 0.0  # ties are not wins


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="nope"):
        dpo_loss(**_random_pairs(), loss_type="nope")


def test_rewards_are_detached():
    pairs = {
        k: v.requires_grad_() if v.is_floating_point() else v for k, v in _random_pairs().items()
    }
    for loss_type in DPO_LOSSES:
        losses, chosen_rewards, rejected_rewards = dpo_loss(**pairs, loss_type=loss_type)
        assert losses.requires_grad
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# ------------------------------------------------------------------------- TRL DPOTrainer oracle


def _trl_dpo(pairs: dict[str, torch.Tensor], loss_type: str, label_smoothing: float):
    """TRL 1.16 `DPOTrainer._compute_loss` on these log-probs -> (mean loss, its metrics).

    The stand-in model returns per-token log-probs spread evenly over each completion, so that
    their row sums are the given log-probs; the reference log-probs go in as precomputed inputs.
    """
    from trl import DPOTrainer

    chosen_lengths, rejected_lengths = pairs["chosen_lengths"], pairs["rejected_lengths"]
    lengths = torch.cat([chosen_lengths, rejected_lengths])  # (2B,) batch is [chosen, rejected]
    logps = torch.cat([pairs["policy_chosen_logps"], pairs["policy_rejected_logps"]])  # (2B,)
    rows, seq = lengths.numel(), int(lengths.max()) + 3  # room for a prompt token and padding
    completion_mask = torch.zeros(rows, seq, dtype=torch.long)  # (2B, T); token 0 is the prompt
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1 : 1 + n] = 1
    shift_mask = completion_mask[:, 1:].to(torch.float64)  # (2B, T-1): predicted completion tokens
    per_token_logps = shift_mask * (logps / lengths).unsqueeze(1)  # (2B, T-1), rows sum to logps

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        zeros = torch.zeros_like(per_token_logps)
        return SimpleNamespace(
            log_probs=per_token_logps,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=BETA,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, seq, dtype=torch.long),
        "attention_mask": torch.ones(rows, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": pairs["reference_chosen_logps"],
        "ref_rejected_logps": pairs["reference_rejected_logps"],
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)],
)
def test_matches_trl_dpo_trainer(loss_type, label_smoothing):
    pairs = _random_pairs(seed=1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        **pairs, loss_type=loss_type, beta=BETA, label_smoothing=label_smoothing
    )
    # TRL returns the batch mean; pair by pair (batches of one) checks each per-pair loss too
    for i in range(losses.numel()):
        one = {k: v[i : i + 1] for k, v in pairs.items()}
        trl_loss, _ = _trl_dpo(one, loss_type, label_smoothing)
        torch.testing.assert_close(losses[i], trl_loss, **FLOAT64_FORMULA)  # float64 formulas
    trl_loss, metrics = _trl_dpo(pairs, loss_type, label_smoothing)
    torch.testing.assert_close(losses.mean(), trl_loss, **FLOAT64_FORMULA)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    # float64 means of 8 rewards |r| < 10: rounding < 1e-13, a formula difference > 1e-3
    assert metrics["rewards/chosen"][0] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"][0] == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)
    # a share of 8 pairs, exact in float32 (k / 8): abs=1e-6 tells one flipped pair from none
    assert metrics["rewards/accuracies"][0] == pytest.approx(accuracy, abs=1e-6)


def test_cdpo_matches_the_written_out_formula():
    # TRL 1.16's DPOTrainer "sigmoid" ignores label_smoothing, so cDPO has no TRL oracle there:
    # compare with -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h) written out here.
    pairs, eps = _random_pairs(seed=2), 0.1
    h = (pairs["policy_chosen_logps"] - pairs["reference_chosen_logps"]) - (
        pairs["policy_rejected_logps"] - pairs["reference_rejected_logps"]
    )
    expected = -(1 - eps) * F.logsigmoid(BETA * h) - eps * F.logsigmoid(-BETA * h)
    losses, _, _ = dpo_loss(**pairs, loss_type="sigmoid", beta=BETA, label_smoothing=eps)
    torch.testing.assert_close(losses, expected, **FLOAT64_FORMULA)  # float64 formulas


# ------------------------------------------------------------------------- TRL CPOTrainer oracle


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.cpo import CPOTrainer

    pairs, gamma = _random_pairs(seed=3), 0.5
    trainer = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    # the CPO trainer takes per-token average log-probs for simpo (average_log_prob=True)
    expected = CPOTrainer.cpo_loss(
        trainer,
        pairs["policy_chosen_logps"] / pairs["chosen_lengths"],
        pairs["policy_rejected_logps"] / pairs["rejected_lengths"],
    )
    # the reference log-probs must not matter
    pairs["reference_chosen_logps"] = torch.full_like(pairs["reference_chosen_logps"], float("nan"))
    got = dpo_loss(
        **pairs, loss_type="simpo", beta=2.0, label_smoothing=label_smoothing, simpo_gamma=gamma
    )
    for actual, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(actual, reference, **FLOAT64_FORMULA)  # float64 formulas


# ------------------------------------------------------------------------------------ gradients


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
    pairs = _random_pairs(seed=4)
    pairs["policy_chosen_logps"].requires_grad_()
    pairs["policy_rejected_logps"].requires_grad_()
    losses, _, _ = dpo_loss(**pairs, loss_type="sigmoid", beta=BETA)
    losses.sum().backward()
    assert torch.all(pairs["policy_chosen_logps"].grad < 0)
    assert torch.all(pairs["policy_rejected_logps"].grad > 0)
