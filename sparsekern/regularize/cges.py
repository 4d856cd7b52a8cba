"""Combined Group and Exclusive Sparsity (Yoon and Hwang, ICML 2017; SCIENCE.md section 3).

After each optimizer step, every regularised layer l gets the group prox with
`lambda_G = lam * mu_l` and then the exclusive prox with `lambda_E = lam * (1 - mu_l)`
(proximal.cges_prox), on "input" groups by default: one input unit's outgoing weights, or for
a conv one input channel at one kernel position across all output filters.

mu schedule: the reference code uses mu_l = 0.8 - 0.2*l for its four layers (l = 0..3), so
group sparsity dominates the lower layers and exclusive sparsity the upper ones. For L layers
we use the linear ramp from `mu_first` to `mu_last` (defaults 0.8 and 0.2), which reproduces
the reference exactly for L = 4; a single layer gets `mu_first`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from sparsekern.regularize.groups import group_rows, write_rows_back
from sparsekern.regularize.penalties import ProximalRegularizer
from sparsekern.regularize.proximal import cges_prox


def mu_ramp(num_layers: int, mu_first: float = 0.8, mu_last: float = 0.2) -> list[float]:
    """Per-layer group-sparsity share: linear from `mu_first` (layer 0) to `mu_last` (last layer)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    for mu in (mu_first, mu_last):
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu values must be in [0, 1], got {mu}")
    if num_layers == 1:
        return [float(mu_first)]
    step = (mu_last - mu_first) / (num_layers - 1)
    return [mu_first + step * l for l in range(num_layers)]


class CGES(ProximalRegularizer):
    """CGES as a prox step usable after any torch optimizer: `reg.step(lr_or_optimizer)`.

    `lam`: overall strength lambda >= 0. `mu_schedule`: a (mu_first, mu_last) pair for the linear
    ramp over the regularised layers (in model order), or one mu per layer. `group_kind`:
    "input" (the paper's groups) or "filter". `layers`: module names to restrict to.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor],
        lam: float,
        mu_schedule: tuple[float, float] | Sequence[float] = (0.8, 0.2),
        group_kind: str = "input",
        layers: Iterable[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        super().__init__(model_or_params, lam, group_kind, layers, optimizer)
        self.mus = self._layer_mus(list(mu_schedule))

    def _layer_mus(self, schedule: list[float]) -> list[float]:
        count = len(self.weights)
        if len(schedule) == count and count != 2:
            mus = [float(m) for m in schedule]
        elif len(schedule) == 2:
            # A pair is always (mu_first, mu_last); with exactly two layers both readings agree.
            mus = mu_ramp(count, schedule[0], schedule[1])
        else:
            raise ValueError(
                f"mu_schedule must be (mu_first, mu_last) or one mu per layer ({count} layers: "
                f"{self.names}); got {len(schedule)} values"
            )
        for name, mu in zip(self.names, mus):
            if not 0.0 <= mu <= 1.0:
                raise ValueError(f"mu for {name} must be in [0, 1], got {mu}")
        return mus

    def _prox(self, index, weight, lr):
        rows = group_rows(weight, self.group_kind)
        cges_prox(rows, lr * self.strength, self.mus[index], inplace=True)
        write_rows_back(weight, rows, self.group_kind)

    def _penalty(self, index, weight):
        # lam * (mu * sum_g ||w_g||_2 + (1 - mu) * 1/2 sum_g ||w_g||_1^2)
        rows = group_rows(weight, self.group_kind)
        mu = self.mus[index]
        group = torch.linalg.vector_norm(rows, dim=1).sum()
        exclusive = 0.5 * rows.abs().sum(dim=1).pow(2).sum()
        return self.strength * (mu * group + (1 - mu) * exclusive)

    def __repr__(self) -> str:
        mus = ", ".join(f"{n}: {m:.3g}" for n, m in zip(self.names, self.mus))
        return f"CGES(lam={self.strength}, group_kind={self.group_kind!r}, mu={{{mus}}})"
