"""`kto_loss` and `orpo_loss` against hand-checked invariants and TRL 1.16's own loss code.

Oracles: KTO ("kto" with the KL reference point, "apo_zero_unpaired") against the real
`trl.KTOTrainer._compute_loss`, called unbound on a stand-in trainer and model with precomputed
reference log-probs; ORPO against the real `trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`
(the odds-ratio term on any batch, the whole loss where TRL's NLL and ours count the same tokens).
Inputs are float64, so agreement to 1e-6 leaves room only for formula differences, not rounding.
"""

import decimal
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.losses import completion_logps, kto_kl_estimate, kto_loss, log1mexp, orpo_loss

from numerics import FLOAT64_FORMULA

BETA = 0.1


def _random_rows(batch: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Summed completion log-probs (float64) of policy and reference, labels, KL-pair log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (batch,), generator=g)

    def logps() -> torch.Tensor:  # about -2 nats per token, with noise
        return -lengths * (2.0 + torch.rand(batch, generator=g, dtype=torch.float64))

    labels = torch.rand(batch, generator=g) < 0.6
    labels[0], labels[1] = True, False  # both kinds in every batch
    return {
        "policy": logps(),
        "reference": logps(),
        "labels": labels,
        "lengths": lengths,
        "policy_kl": logps(),
        "reference_kl": logps() - 3.0,  # a positive KL estimate, so the clamp does not hide it
    }


# ------------------------------------------------------------------------------- invariants


def test_kto_at_the_reference_is_half_for_every_row():
    rows = _random_rows()
    losses, rewards = kto_loss(
        rows["policy"], rows["policy"].clone(), rows["labels"], torch.tensor(0.0), beta=BETA
    )
    # r = x - x = 0 and z0 = 0: 1 - sigmoid(0) = 0.5 for both kinds, up to exp's rounding at 0
    # (an ulp at most, under the float64 default rtol 1e-7; a loss of another form is not 0.5)
    torch.testing.assert_close(losses, torch.full_like(losses, 0.5))
    assert torch.equal(rewards, torch.zeros_like(rewards))


def test_kto_weights_scale_each_kind_alone():
    rows = _random_rows(seed=1)
    kl = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    plain, _ = kto_loss(rows["policy"], rows["reference"], rows["labels"], kl, beta=BETA)
    weighted, _ = kto_loss(
        rows["policy"], rows["reference"], rows["labels"], kl, beta=BETA,
        desirable_weight=2.0, undesirable_weight=0.5,
    )  # fmt: skip
    good = rows["labels"]
    # exact: each weight multiplies the same float64 loss, and 1.0, 2.0 and 0.5 multiply exactly
    assert torch.equal(weighted[good], 2.0 * plain[good])
    assert torch.equal(weighted[~good], 0.5 * plain[~good])


def test_kl_estimate_is_clamped_and_detached():
    a = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert kto_kl_estimate(a, a.detach() + 1.0).item() == 0.0  # negative mean -> 0
    kl = kto_kl_estimate(a, a.detach() - 1.0)
    assert kl.item() == 1.0 and not kl.requires_grad  # exact: small integers in float32


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    rows = _random_rows(seed=2)
    policy = rows["policy"].clone().requires_grad_(True)
    kl = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    losses, _ = kto_loss(policy, rows["reference"], rows["labels"], kl, beta=BETA)
    losses.sum().backward()
    assert (policy.grad[rows["labels"]] < 0).all()  # descent raises a desirable row's log-prob
    assert (policy.grad[~rows["labels"]] > 0).all()  # and lowers an undesirable one's


def test_unknown_kto_loss_type_raises():
    rows = _random_rows()
    with pytest.raises(ValueError, match="unknown KTO loss_type"):
        kto_loss(rows["policy"], rows["reference"], rows["labels"], torch.tensor(0.0), "nope")


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-10, -0.1, -math.log(2), -5.0, -50.0], dtype=torch.float64)
    # the true values, from 50-digit decimal arithmetic; a naive log(1 - exp(x)) loses all digits
    # near 0 (1 - exp(-1e-10) cancels) and log(-expm1(x)) rounds to 0 at -50
    with decimal.localcontext() as context:
        context.prec = 50
        true = [float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()]
    # float64 carries ~16 digits; 1e-12 relative leaves room for the exp/log1p roundings only
    torch.testing.assert_close(
        log1mexp(x), torch.tensor(true, dtype=torch.float64), rtol=1e-12, atol=0
    )


# ------------------------------------------------------------------------ TRL KTOTrainer oracle


def _trl_kto(rows: dict[str, torch.Tensor], loss_type: str, weights: tuple[float, float]):
    """TRL 1.16 `KTOTrainer._compute_loss` on these log-probs -> (mean loss, its metrics).

    The stand-in model returns per-token log-probs spread evenly over each completion, so their
    row sums are the given log-probs: the policy's for the matched rows, the policy's KL-pair
    log-probs for the KL rows (told apart by their ids); the reference's go in as precomputed."""
    from trl import KTOTrainer

    n, seq = len(rows["labels"]), int(rows["lengths"].max()) + 3
    completion_mask = torch.zeros(n, seq, dtype=torch.long)  # token 0 is the prompt
    for i, length in enumerate(rows["lengths"].tolist()):
        completion_mask[i, 1 : 1 + length] = 1
    shift = completion_mask[:, 1:].to(torch.float64)
    matched = shift * (rows["policy"] / rows["lengths"]).unsqueeze(1)
    mismatched = shift * (rows["policy_kl"] / rows["lengths"]).unsqueeze(1)

    def model(**kwargs):
        is_kl = bool((kwargs["input_ids"] == 1).all())
        per_token = mismatched if is_kl else matched
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type=loss_type,
        beta=BETA,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(
        trainer, model, batch
    )
    inputs = {
        "input_ids": torch.zeros(n, seq, dtype=torch.long),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.ones(n, seq, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, seq, dtype=torch.long),
        "KL_completion_mask": completion_mask,
        "label": rows["labels"],
        "ref_logps": rows["reference"],
        "ref_KL_logps": rows["reference_kl"],
    }
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "weights"),
    [("kto", (1.0, 1.0)), ("kto", (1.33, 0.75)), ("apo_zero_unpaired", (1.0, 2.0))],
)
@pytest.mark.parametrize("seed", [3, 4])
def test_matches_trl_kto_trainer(loss_type, weights, seed):
    rows = _random_rows(seed=seed)
    kl = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    losses, rewards = kto_loss(
        rows["policy"], rows["reference"], rows["labels"], kl, loss_type=loss_type, beta=BETA,
        desirable_weight=weights[0], undesirable_weight=weights[1],
    )  # fmt: skip
    trl_loss, metrics = _trl_kto(rows, loss_type, weights)
    torch.testing.assert_close(losses.mean(), trl_loss, **FLOAT64_FORMULA)  # float64 formulas
    good = rows["labels"]
    # float64 means of <= 10 rewards or log-ratios |r| < 40: rounding < 1e-12, a formula's > 1e-3
    assert metrics["rewards/chosen"][0] == pytest.approx(rewards[good].mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"][0] == pytest.approx(rewards[~good].mean().item(), abs=1e-6)
    if loss_type == "kto":
        assert metrics["kl"][0] == pytest.approx(kl.item(), abs=1e-6)


# ------------------------------------------------------------------------ ORPO and TRL's oracle


def _orpo_batch(chosen_lengths: list[int], rejected_lengths: list[int], seed: int = 5):
    """Random logits and a one-token prompt per row (TRL's NLL counts prompt tokens after the
    first: with one, it counts exactly the completion tokens ours does)."""
    g = torch.Generator().manual_seed(seed)
    vocab, seq = 11, max(chosen_lengths + rejected_lengths) + 2

    def side(lengths):
        n = len(lengths)
        ids = torch.randint(2, vocab, (n, seq), generator=g)
        mask = torch.zeros(n, seq, dtype=torch.long)
        labels = torch.full((n, seq), -100)
        for i, length in enumerate(lengths):
            mask[i, : 1 + length] = 1
            labels[i, 1 : 1 + length] = ids[i, 1 : 1 + length]
        return ids * mask, mask, labels

    batch = {}
    for name, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        ids, mask, labels = side(lengths)
        batch |= {
            f"{name}_input_ids": ids,
            f"{name}_attention_mask": mask,
            f"{name}_labels": labels,
        }
    logits = torch.randn(2 * len(chosen_lengths), seq, vocab, generator=g, dtype=torch.float64)
    return batch, logits


def _trl_orpo(batch, logits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.orpo import ORPOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        beta=BETA, accelerator=accelerator, is_encoder_decoder=False, padding_value=0,
        aux_loss_enabled=False, label_pad_token_id=-100,
    )  # fmt: skip
    trainer.concatenated_inputs = ORPOTrainer.concatenated_inputs
    trainer.get_batch_logps = ORPOTrainer.get_batch_logps
    trainer.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trainer, c, r)
    trainer.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(trainer, m, b)
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    return ORPOTrainer.get_batch_loss_metrics(trainer, model, batch)


def _ours(batch, logits):
    n = len(batch["chosen_labels"])
    sums, counts = completion_logps(
        logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    )
    return orpo_loss(sums[:n], sums[n:], counts[:n], counts[n:], beta=BETA)


def test_orpo_matches_trl_orpo_trainer():
    # equal chosen lengths: TRL's NLL (a token mean over the batch) = the mean of our per-pair NLLs
    batch, logits = _orpo_batch([5, 5, 5, 5], [2, 7, 4, 9])
    losses, chosen_rewards, rejected_rewards, parts = _ours(batch, logits)
    trl_loss, metrics = _trl_orpo(batch, logits)
    torch.testing.assert_close(losses.mean(), trl_loss, **FLOAT64_FORMULA)  # float64 formulas
    # float64 log-softmaxes over 11 logits and means of <= 36 log-probs: rounding < 1e-13
    assert metrics["nll_loss"] == pytest.approx(parts["nll"].mean().item(), abs=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx(parts["log_odds"].mean().item(), abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)


def test_orpo_odds_ratio_term_matches_trl_at_any_lengths():
    # unequal chosen lengths: the odds-ratio term still equals TRL's; only the NLL's weighting
    # differs (ours: each pair's mean, as the paper's L_SFT; TRL: a token mean over the batch)
    batch, logits = _orpo_batch([1, 6, 3, 9], [2, 7, 4, 9], seed=6)
    losses, _, _, parts = _ours(batch, logits)
    _, metrics = _trl_orpo(batch, logits)
    odds_term = (losses - parts["nll"]).mean().item()  # -beta * mean logsigmoid(log odds)
    # float64 as above; the difference losses - nll cancels at most a few units: still < 1e-13
    assert odds_term == pytest.approx(-BETA * metrics["log_odds_ratio"], abs=1e-6)


def test_orpo_is_its_formula_and_pushes_chosen_up():
    chosen = torch.tensor([-6.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-4.0, -9.0], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])
    losses, _, _, _ = orpo_loss(chosen, rejected, lengths, lengths, beta=0.5)
    pc, pr = chosen.detach() / lengths, rejected.detach() / lengths
    odds = lambda p: p.exp() / (1 - p.exp())  # noqa: E731
    expected = -pc - 0.5 * F.logsigmoid(torch.log(odds(pc) / odds(pr)))
    # float64, values < 10 and no cancellation (1 - exp(p) >= 0.6 here): a few ulps, ~1e-15
    torch.testing.assert_close(losses.detach(), expected, rtol=1e-12, atol=1e-12)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
