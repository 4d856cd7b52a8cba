"""Split LBI (Fu, Liu, Li, Sun, Zeng, Yao; SCIENCE.md section 4) as a torch optimizer.

Each sparse weight W is coupled to a sparse Gamma through an auxiliary V. One step, with
alpha = lr, from the current (W, V, Gamma):

    W     <- W - kappa*alpha*(grad + (W - Gamma)/nu)
    V     <- V + (alpha/nu)*(W - Gamma)
    Gamma <- kappa * Prox(V)

The W and V updates both use the W and Gamma from before the step (they are the two halves
of one gradient step on loss(W) + ||W - Gamma||^2 / (2 nu), as in the paper and in the
authors' DessiLBI code). Prox is
  "elementwise"  soft threshold at 1:                   sign(v) * max(0, |v| - 1)
  "filter"/"group" per output unit (conv filter or Linear row):  v_f * max(0, 1 - 1/||v_f||_2)
with `fc_mode` choosing it for Linear (2-D) weights, `conv_mode` for conv (>= 3-D) weights;
GS-P is conv_mode="filter" + fc_mode="group". `momentum` and `weight_decay` act on the loss
gradient only (torch SGD conventions: grad + wd*W, buffer = momentum*buffer + that), never on
the coupling term, as in DessiLBI. Every other parameter (biases, BatchNorm, or a param group
with `sparse=False`) takes a plain SGD step `W <- W - lr*(momentum-averaged grad + wd*W)`.

Support tracking: a unit (a filter / row, or a single weight in elementwise mode) is in the
support when its Gamma is nonzero. `state[p]["entry_step"]` holds, per unit, the first step
after which it was in the support (steps count from 1; -1 = never), kept on the device with
`torch.where` against a device-side step counter, so `step()` reads nothing back to the host
(no `.item()`, no sync). `record_epoch(epoch)`, called at the end of each epoch, fills
`state[p]["entry_epoch"]` (the first recorded epoch by which the unit had entered) and
appends a copy of the support to `state[p]["support_history"]`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sparsekern.regularize.masks import slbi_masks
from sparsekern.regularize.proximal import group_shrink_factors, soft_threshold

FC_MODES = ("elementwise", "group")
CONV_MODES = ("filter", "elementwise")


class SplitLBI(torch.optim.Optimizer):
    """Split LBI optimizer for structural sparsity in training (see the module docstring).

    `params`: parameters or param groups; a group may set `sparse=False` to give its >= 2-D
    weights a plain SGD step (default: every >= 2-D parameter is sparse, 0/1-D ones are not).
    `lr` = alpha > 0, `kappa` > 0, `nu` > 0 (typical 20..500), `momentum` in [0, 1),
    `weight_decay` >= 0, `fc_mode` in ("elementwise", "group"), `conv_mode` in
    ("filter", "elementwise").
    """

    def __init__(
        self,
        params,
        lr: float,
        kappa: float = 1.0,
        nu: float = 100.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fc_mode: str = "elementwise",
        conv_mode: str = "filter",
    ):
        defaults = dict(
            lr=lr, kappa=kappa, nu=nu, momentum=momentum, weight_decay=weight_decay,
            fc_mode=fc_mode, conv_mode=conv_mode, sparse=True,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (options default to the constructor's), validating its options."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to its parameter's dtype; give the step
        counters and entry steps back their int64 type and the support history its bools."""
        super().load_state_dict(state_dict)
        for p, _ in self._sparse_params():
            state = self.state[p]
            for key in ("lbi_step", "entry_step", "entry_epoch"):
                if key in state:
                    state[key] = state[key].to(torch.int64)
            if "support_history" in state:
                state["support_history"] = [(epoch, mask.bool()) for epoch, mask in state["support_history"]]

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One Split LBI step for the sparse weights, one SGD step for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, kappa, nu = group["lr"], group["kappa"], group["nu"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._loss_direction(p, group)
                mode = self._mode(p, group)
                if mode is None:
                    p.add_(grad, alpha=-lr)
                    continue
                state = self._lbi_state(p, group)
                gamma, v = state["Gamma"], state["V"]
                coupling = p - gamma                        # W_k - Gamma_k, before either update
                v.add_(coupling, alpha=lr / nu)
                p.add_(grad, alpha=-kappa * lr)
                p.add_(coupling, alpha=-kappa * lr / nu)
                in_support = self._update_gamma(gamma, v, mode, kappa)
                state["lbi_step"].add_(1)
                entry = state["entry_step"]
                state["entry_step"] = torch.where((entry < 0) & in_support, state["lbi_step"], entry)
        return loss

    @staticmethod
    def _update_gamma(gamma: torch.Tensor, v: torch.Tensor, mode: str, kappa: float) -> torch.Tensor:
        """Gamma <- kappa * Prox(V), in place; returns the unit support of the new Gamma."""
        if mode == "elementwise":
            torch.mul(soft_threshold(v, 1.0), kappa, out=gamma)
            return gamma != 0
        rows = v.view(v.shape[0], -1)
        factors = group_shrink_factors(rows, 1.0)
        torch.mul(rows, factors * kappa, out=gamma.view(rows.shape))
        return factors.view(-1) > 0

    def _loss_direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """grad + weight_decay*W, through the momentum buffer (torch SGD convention)."""
        grad = p.grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            state = self.state[p]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = grad.detach().clone()
            else:
                buffer.mul_(group["momentum"]).add_(grad)
            grad = buffer
        return grad

    # ---- which parameters, which units ------------------------------------------------------

    def _mode(self, p: torch.Tensor, group: dict) -> str | None:
        """The prox mode of a parameter, or None for a plain-SGD one."""
        if not group["sparse"] or p.dim() < 2:
            return None
        return group["fc_mode"] if p.dim() == 2 else group["conv_mode"]

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"this parameter (shape {tuple(p.shape)}) is not optimised by this SplitLBI")

    def _sparse_params(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for group in self.param_groups:
            for p in group["params"]:
                if self._mode(p, group) is not None:
                    yield p, group

    def unit_kind(self, param: torch.Tensor) -> str:
        """The unit Split LBI selects for this sparse parameter: "weight" or "filter"."""
        return "weight" if self._sparse_mode(param) == "elementwise" else "filter"

    def _sparse_mode(self, param: torch.Tensor) -> str:
        mode = self._mode(param, self._group_of(param))
        if mode is None:
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not a sparse (Split LBI) parameter: "
                "it has < 2 dims or its param group has sparse=False"
            )
        return mode

    def _lbi_state(self, p: torch.Tensor, group: dict) -> dict:
        """V, Gamma and the support bookkeeping of a sparse parameter, created on first use."""
        state = self.state[p]
        if "Gamma" not in state:
            mode = self._mode(p, group)
            units = p.shape if mode == "elementwise" else p.shape[:1]
            # contiguous_format so the per-filter (out, -1) views below never need a copy.
            state["V"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["Gamma"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["lbi_step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["entry_step"] = torch.full(units, -1, dtype=torch.int64, device=p.device)
            state["entry_epoch"] = torch.full(units, -1, dtype=torch.int64, device=p.device)
            state["support_history"] = []
        return state

    # ---- support, ranking, evaluation -------------------------------------------------------

    @torch.no_grad()
    def support(self, param: torch.Tensor) -> torch.Tensor:
        """Bool mask of the units whose Gamma is nonzero: shape (out,) per filter / row, or the
        weight's shape in elementwise mode."""
        mode = self._sparse_mode(param)
        return _unit_support(self._lbi_state(param, self._group_of(param))["Gamma"], mode)

    @torch.no_grad()
    def record_epoch(self, epoch: int) -> None:
        """Call at the end of epoch `epoch`: set `entry_epoch` of units that entered the support
        since the last call, and append (epoch, support) to each weight's support history."""
        for p, group in self._sparse_params():
            state = self._lbi_state(p, group)
            entered = (state["entry_epoch"] < 0) & (state["entry_step"] >= 0)
            state["entry_epoch"] = torch.where(entered, epoch, state["entry_epoch"])
            state["support_history"].append((epoch, self.support(p).clone()))

    def support_history(self, param: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The (epoch, support mask) pairs recorded by `record_epoch` for this parameter."""
        self._sparse_mode(param)
        return list(self._lbi_state(param, self._group_of(param))["support_history"])

    @torch.no_grad()
    def importance(self, param: torch.Tensor) -> torch.Tensor:
        """Unit indices, most important first (flat indices in elementwise mode).

        Order: earlier entry into Gamma's support first (never-entered units last), ties broken
        by larger ||Gamma_unit||_2, then by larger ||W_unit||_2, then by lower index.
        """
        mode = self._sparse_mode(param)
        state = self._lbi_state(param, self._group_of(param))
        if mode == "elementwise":
            gamma_norm, weight_norm = state["Gamma"].abs().flatten(), param.abs().flatten()
        else:
            gamma_norm = torch.linalg.vector_norm(state["Gamma"].view(param.shape[0], -1), dim=1)
            weight_norm = torch.linalg.vector_norm(param.reshape(param.shape[0], -1), dim=1)
        entry = state["entry_step"].flatten()
        entry = torch.where(entry < 0, torch.iinfo(torch.int64).max, entry)
        # Stable sorts from the least to the most significant key give the lexicographic order.
        order = torch.sort(weight_norm, descending=True, stable=True).indices
        order = order[torch.sort(gamma_norm[order], descending=True, stable=True).indices]
        return order[torch.sort(entry[order], stable=True).indices]

    def prune_masks(self, keep_ratio: float) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: weight-shaped bool mask} keeping the top `keep_ratio` of each sparse
        weight's units by `importance` (see masks.py for the count). To get names for
        `apply_masks`: `{n: m[p] for n, p in model.named_parameters() if p in m}`."""
        return {p: slbi_masks(self, p, keep_ratio) for p, _ in self._sparse_params()}

    @contextmanager
    def use_gamma(self):
        """Temporarily replace every sparse W by W * (unit in Gamma's support): the network
        pruned by Split LBI's support, for evaluation. The original weights come back on exit."""
        saved = []
        with torch.no_grad():
            for p, group in self._sparse_params():
                saved.append((p, p.detach().clone()))
                mode = self._mode(p, group)
                keep = _unit_support(self._lbi_state(p, group)["Gamma"], mode)
                if mode != "elementwise":
                    keep = keep.view(-1, *([1] * (p.dim() - 1)))
                p.mul_(keep)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, original in saved:
                    p.copy_(original)


def _unit_support(gamma: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "elementwise":
        return gamma != 0
    return gamma.view(gamma.shape[0], -1).ne(0).any(dim=1)


def _check_group(group: dict) -> None:
    checks = (
        ("lr", group["lr"] > 0), ("kappa", group["kappa"] > 0), ("nu", group["nu"] > 0),
        ("momentum", 0 <= group["momentum"] < 1), ("weight_decay", group["weight_decay"] >= 0),
    )
    for name, ok in checks:
        if not ok:
            raise ValueError(f"SplitLBI: invalid {name} {group[name]!r}")
    if group["fc_mode"] not in FC_MODES:
        raise ValueError(f"SplitLBI: fc_mode must be one of {FC_MODES}, got {group['fc_mode']!r}")
    if group["conv_mode"] not in CONV_MODES:
        raise ValueError(f"SplitLBI: conv_mode must be one of {CONV_MODES}, got {group['conv_mode']!r}")
    for p in group["params"]:
        if p.dim() >= 2 and group["sparse"] and not p.is_floating_point():
            raise TypeError(f"SplitLBI: sparse parameters must be floating point, got {p.dtype}")
