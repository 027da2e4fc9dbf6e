"""Tolerances that follow from the numerics, for tests that compare two computations of a value.

Every float comparison in tests/ is one of three kinds, and says which in a comment:
- exact by construction: the same operations on the same inputs in the same order, in the same
  process (or a process with the same kernels and thread count) -> `==` / `torch.equal`;
- a formula checked against another (TRL's code, a hand-written one, 50-digit decimals) on the
  same float64 inputs: the rounding is ~1e-13 or less, so a tolerance far above it and far below
  any formula difference (`FLOAT64_FORMULA`);
- the same value computed in another order (several processes, another padding width, a fused
  kernel, another CPU's kernels): the difference is rounding, bounded by the number and size of
  the terms summed (`reordered_sum`), never by the size of the result. A small difference of
  large sums (a KL of 0.03 between log-probs of tens of nats) keeps the large sums' error.

The numbers here are the unit roundoffs of the dtypes (torch.finfo(dtype).eps, the gap between 1
and the next number), and Higham's bound for recursive summation (Accuracy and Stability of
Numerical Algorithms, 2nd ed., 2002, eq. 4.4): a float sum of n terms is within (n - 1) * eps/2 *
sum|x_i| of the exact sum, whatever the order, so two orders differ by at most (n - 1) * eps *
sum|x_i|. Pairwise and blocked sums (what BLAS and torch's reductions do) stay well inside it.
"""

from __future__ import annotations

EPS32 = 2.0**-23  # float32: 1.19e-7
EPS64 = 2.0**-52  # float64: 2.22e-16
EPS_BF16 = 2.0**-7  # bfloat16: 7.8e-3 (8 bits of mantissa)

# Two float64 evaluations of one formula on the same inputs (ours against TRL's or a written-out
# one): values O(1..100), at most ~1e4 terms, so rounding stays under 1e4 * 100 * EPS64 = 2e-10;
# a formula difference (a missing beta, a sign, another normalisation) moves values by > 1e-3.
FLOAT64_FORMULA = {"rtol": 1e-6, "atol": 1e-6}


def reordered_sum(n_terms: int, magnitude: float, eps: float = EPS32) -> float:
    """The most two evaluations of a sum of `n_terms` terms can differ by when they add in other
    orders: (n - 1) * eps * magnitude, where `magnitude` bounds the sum of the terms' absolute
    values (Higham's eq. 4.4 for each, added). For a mean, pass the mean of the absolute values."""
    return max(n_terms - 1, 1) * eps * magnitude


def log_softmax_error(vocab: int, max_abs_logit: float, eps: float = EPS32) -> float:
    """The most two evaluations of one log-softmax entry z_i - max z - log sum exp(z_j - max z)
    over `vocab` logits |z| <= max_abs_logit can differ by: the sum of `vocab` exponentials, all
    positive ((V - 1) eps/2 relative, so absolute in its log), the rounding of each exponent and exp
    (V eps / 2e and eps relative), and the subtractions on values up to 2 max|z| + log V (a few eps
    each); each evaluation within half of (2V + 4) eps (1 + max|z|). Logits that themselves differ
    by d (another matmul order) move a log-prob by up to 2d more (its logit and the log-sum-exp)."""
    return (2 * vocab + 4) * eps * (1 + max_abs_logit)
