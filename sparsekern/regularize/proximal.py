"""Proximal operators of the sparsity penalties, on "rows = groups" tensors (see groups.py).

Each operator is a pure function of a 2-D tensor whose rows are the groups (elementwise ones
take any shape), computed in the tensor's own dtype (group norms of float16 / bfloat16 rows
are accumulated in float32) and on its device, vectorised over all groups. `threshold` is the
step's `lr * lambda`: a Python number or a 0-dim tensor on the same device (a tensor learning
rate then costs no host sync). With `inplace=True` the input
is overwritten and returned (pass a view of a weight to update the weight).

  group lasso      w_g  <- max(0, 1 - t / ||w_g||_2) * w_g          (an all-zero group stays 0)
  exclusive lasso  w_gi <- sign(w_gi) * max(0, |w_gi| - t * ||w_g||_1)
  lasso            w_i  <- sign(w_i) * max(0, |w_i| - t)            (soft threshold)
  ridge            w    <- w / (1 + t)                              (exact prox of t/2 ||w||^2)
  CGES             group prox with t_G = lr*lam*mu, then exclusive prox with t_E = lr*lam*(1-mu)

Exclusive lasso: we implement the form of SCIENCE.md section 3 and of the CGES paper,
a soft threshold whose per-group level t * ||w_g||_1 is read from the group as it is before
the step. It is a linearised step, not the exact prox of (t/2) ||w_g||_1^2 (that one
thresholds at t/(1 + t*k) * (sum of the k largest |w_gi|) for a data-dependent k and needs a
sort per group). The published CGES code (jaehong31/CGES, main.py) applies the same
elementwise rule (threshold from the group-prox output, shared by the whole group) but also
multiplies lambda_G and lambda_E by hand-set per-layer constants ([1, 1, 1/15, 1/144] and
[1, 1, 15, 144]) tuned to its four-layer MNIST network; they do not generalise to other
networks, so they are left out here (scale `lam` per layer instead if needed).
"""
from __future__ import annotations

import torch

Threshold = float | torch.Tensor


def _check_threshold(threshold: Threshold, what: str) -> None:
    # A tensor threshold is not inspected: reading its value would force a host sync.
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0:
            raise ValueError(f"{what} threshold must be a number or a 0-dim tensor, got shape {tuple(threshold.shape)}")
        return
    if not (threshold >= 0.0) or threshold == float("inf"):
        raise ValueError(f"{what} threshold (lr * lambda) must be finite and >= 0, got {threshold}")


def _check_rows(rows: torch.Tensor, what: str) -> None:
    if rows.dim() != 2:
        raise ValueError(f"{what} expects a 2-D tensor with one group per row, got shape {tuple(rows.shape)}")
    if not rows.is_floating_point():
        raise TypeError(f"{what} expects a floating-point tensor, got {rows.dtype}")


def group_lasso_prox(rows: torch.Tensor, threshold: Threshold, inplace: bool = False) -> torch.Tensor:
    """Prox of `threshold * sum_g ||w_g||_2`: shrink each row's L2 norm by `threshold`.

    Rows whose norm is <= threshold become exactly zero; an all-zero row stays zero (no NaN).
    """
    scale = group_shrink_factors(rows, threshold)
    return rows.mul_(scale) if inplace else rows * scale


def group_shrink_factors(rows: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """The group-lasso prox as per-row factors, (G, 1) in the rows' dtype:
    `max(0, 1 - threshold / ||w_g||_2)`, 0 for an all-zero row (> 0 exactly for surviving rows)."""
    _check_rows(rows, "group_lasso_prox")
    _check_threshold(threshold, "group_lasso_prox")
    norms = row_norms(rows)
    # Dividing by a norm floored at the smallest normal number keeps zero rows NaN-free: there
    # the scale is 1 - t/tiny <= 0 -> 0 for t > 0, and 1 (times a zero row) for t = 0.
    return (1 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0).to(rows.dtype)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, (G, 1); accumulated in float32 for half / bfloat16 rows.

    Square-sum-sqrt rather than `torch.linalg.vector_norm`, which is several times slower on
    the transposed (strided) rows of "input" groups.
    """
    acc = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return acc.square().sum(dim=1, keepdim=True).sqrt()


def exclusive_lasso_prox(rows: torch.Tensor, threshold: Threshold, inplace: bool = False) -> torch.Tensor:
    """Exclusive-sparsity step: soft-threshold every w_gi at `threshold * ||w_g||_1`.

    The (1,2)-norm step of SCIENCE.md section 3 (see the module docstring for how it relates
    to the exact prox and to the published CGES code).
    """
    _check_rows(rows, "exclusive_lasso_prox")
    _check_threshold(threshold, "exclusive_lasso_prox")
    levels = threshold * rows.abs().sum(dim=1, keepdim=True)
    return _soft_threshold(rows, levels, inplace)


def soft_threshold(x: torch.Tensor, threshold: Threshold, inplace: bool = False) -> torch.Tensor:
    """Lasso prox: `sign(x) * max(0, |x| - threshold)`, elementwise, any shape."""
    if not x.is_floating_point():
        raise TypeError(f"soft_threshold expects a floating-point tensor, got {x.dtype}")
    _check_threshold(threshold, "soft_threshold")
    return _soft_threshold(x, threshold, inplace)


def _soft_threshold(x: torch.Tensor, levels: Threshold, inplace: bool) -> torch.Tensor:
    # x - clamp(x, -t, t) is exactly sign(x) * max(0, |x| - t) for t >= 0, in one temporary.
    if isinstance(levels, torch.Tensor):
        levels = levels.to(x.dtype)
    clipped = torch.clamp(x, min=-levels, max=levels)
    return x.sub_(clipped) if inplace else x - clipped


def ridge_prox(x: torch.Tensor, threshold: Threshold, inplace: bool = False) -> torch.Tensor:
    """Ridge prox: `x / (1 + threshold)`, the exact prox of `threshold/2 * ||x||_2^2`."""
    if not x.is_floating_point():
        raise TypeError(f"ridge_prox expects a floating-point tensor, got {x.dtype}")
    _check_threshold(threshold, "ridge_prox")
    factor = 1 / (1 + threshold)
    return x.mul_(factor) if inplace else x * factor


def cges_prox(rows: torch.Tensor, threshold: Threshold, mu: float, inplace: bool = False) -> torch.Tensor:
    """Combined group and exclusive sparsity step for one layer (rows = groups).

    Group prox at `threshold * mu`, then exclusive prox at `threshold * (1 - mu)`, in that
    order; `threshold` is `lr * lambda` and `mu` in [0, 1] the layer's share of group sparsity.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"cges_prox: mu must be in [0, 1], got {mu}")
    out = group_lasso_prox(rows, threshold * mu, inplace=inplace)
    return exclusive_lasso_prox(out, threshold * (1 - mu), inplace=True)
