"""How much of each BN scale's movement comes from the regulariser and how much from the loss.

The paper's hypothesis (SCIENCE.md): selective features see a disproportionately higher amount of
regularization than gradient. ``UpdateSplit`` measures it per channel of every BatchNorm gamma:
each optimizer step's update of gamma is split exactly into the part the loss gradient causes and
the part the regulariser causes, and the sizes of both are summed over the steps of a window.

Why the split is exact: every supported optimizer's update is a per-element preconditioner P_t
(read from the optimizer's state after the step) times a first-moment buffer M_t that is linear in
the gradients (the gradient itself, or its momentum / exponential average). With the gradient
g = g_loss + g_reg (L2: g_reg = lambda * gamma), M_t = M_loss + M_reg, where each part follows M's
own recursion on its gradient alone, so

    update = P_t * M_loss + P_t * M_reg    (loss part + regulariser part, summing to the update)

    sgd       P = lr                                   M = g
    momentum  P = lr                                   M = mu * M + g
    adam      P = lr / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)    M = b1 * M + (1 - b1) * g
    adamax    P = lr / (1 - b1^t) / u                  M = b1 * M + (1 - b1) * g
    rmsprop   P = lr / (sqrt(v) + eps)                 M = g
    adagrad   P = lr_t / (sqrt(sum g^2) + eps)         M = g

(v, u, sum: the optimizer's second-moment state, which depends on the total gradient: an adaptive
method scales the regulariser's steady pull by the loss gradient's history, the mechanism the
hypothesis is about). Decoupled weight decay (``wd``) is not preconditioned: its part is the
decay step itself, lambda * lr_t / lr_0 * gamma, and the optimizer's whole update is the loss part.
The optimizer options must be torch's defaults for the listed formulas (no Nesterov, dampening,
amsgrad, centred RMSprop, RMSprop momentum or lr decay); anything else raises ConfigError.

Per window (an eval interval) and channel: ``reg`` = sum over steps of |regulariser part|,
``loss`` = sum of |loss part|. The state (M parts and sums) is checkpointed with the optimizer.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern.errors import ConfigError

# The optimizer options the formulas above assume: torch's defaults for these.
_DEFAULT_OPTIONS = {
    "momentum": {"nesterov": False, "dampening": 0},
    "adam": {"amsgrad": False, "maximize": False},
    "adamax": {"maximize": False},
    "rmsprop": {"centered": False, "momentum": 0},
    "adagrad": {"lr_decay": 0},
}
OPTIMIZERS = ("sgd", "momentum", "adam", "adamax", "rmsprop", "adagrad")
REGULARIZERS = ("none", "l2", "wd")


def check_supported(optimizer: str, reg: str) -> None:
    """ConfigError unless the update of ``optimizer`` with ``reg`` can be split exactly."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"log_mechanism=True: optimizer={optimizer!r} is not supported; the update split is "
                          f"exact for {', '.join(OPTIMIZERS)}")
    if reg not in REGULARIZERS:
        raise ConfigError(f"log_mechanism=True: reg={reg!r} is not supported; the update split knows "
                          f"{', '.join(REGULARIZERS)}")


def batchnorm_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{BN module name: its weight}`` for every BatchNorm with a trainable scale."""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad}


class UpdateSplit:
    """Splits each step's update of the BN scales into loss and regulariser parts (module docstring).

    Call ``before_step()`` after backward and before ``optimizer.step()``, ``after_step(lr)`` right
    after it (before a decoupled decay is applied), ``window()`` at the end of each window.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, scales: dict[str, nn.Parameter], *,
                 decoupled_strength: float = 0.0, lr0: float = 1.0):
        if kind not in OPTIMIZERS:
            raise ConfigError(f"UpdateSplit: optimizer {kind!r} is not supported; expected one of {', '.join(OPTIMIZERS)}")
        self.optimizer, self.kind, self.scales = optimizer, kind, dict(scales)
        self.decoupled_strength, self.lr0 = float(decoupled_strength), float(lr0)
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [name for name, p in self.scales.items() if id(p) not in groups]
        if missing:
            raise ValueError(f"UpdateSplit: BN scale(s) {', '.join(missing)} are not in the optimizer")
        self.groups = {name: groups[id(p)] for name, p in self.scales.items()}
        for name, group in self.groups.items():
            for option, default in _DEFAULT_OPTIONS.get(kind, {}).items():
                if group.get(option, default) != default:
                    raise ConfigError(f"log_mechanism=True: {kind} with {option}={group[option]!r} ({name}); the "
                                      f"update split assumes {option}={default!r}")
            if kind == "sgd" and group.get("momentum", 0) != 0:
                raise ConfigError("log_mechanism=True: optimizer 'sgd' with momentum; use optimizer 'momentum'")
        zeros = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in self.scales.items()}
        self.moment = {part: {n: z.clone() for n, z in zeros.items()} for part in ("loss", "reg")}
        self.sums = {part: {n: z.clone() for n, z in zeros.items()} for part in ("loss", "reg")}
        self._grads: dict = {}
        # This step's parts, signed, as amounts subtracted from gamma: {name: (loss part, reg part)}.
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def before_step(self) -> None:
        """Record this step's gradient parts: the loss's (``.grad``) and an L2 penalty's (lambda * gamma).
        A scale without a gradient is skipped by the optimizer (no L2 step either), and here."""
        self._grads = {name: (p.grad.double(), p.detach().double() * self.groups[name]["weight_decay"])
                       for name, p in self.scales.items() if p.grad is not None}

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Add this step's parts (``lr``: the step's learning rate) to the window's sums."""
        self.last = {}
        for name, p in self.scales.items():
            parts = {"loss": torch.zeros_like(p, dtype=torch.float64), "reg": torch.zeros_like(p, dtype=torch.float64)}
            if name in self._grads:
                group, state = self.groups[name], self.optimizer.state[p]
                precondition = self._preconditioner(group, state, lr)
                for part, grad in zip(("loss", "reg"), self._grads[name]):
                    parts[part] += precondition * self._advance(group, self.moment[part][name], grad)
            if self.decoupled_strength:  # the decay step regularizer.step(lr) is about to apply
                parts["reg"] += self.decoupled_strength * lr / self.lr0 * p.detach().double()
            for part, value in parts.items():
                self.sums[part][name] += value.abs()
            self.last[name] = (parts["loss"], parts["reg"])
        self._grads = {}

    def _advance(self, group: dict, moment: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """M's recursion of this optimizer, applied to one part (in place); returns the part's M."""
        if self.kind == "momentum":
            return moment.mul_(group["momentum"]).add_(grad)
        if self.kind in ("adam", "adamax"):
            return moment.mul_(group["betas"][0]).add_(grad, alpha=1.0 - group["betas"][0])
        return moment.copy_(grad)  # sgd, rmsprop, adagrad: M is the gradient

    def _preconditioner(self, group: dict, state: dict, lr: float) -> torch.Tensor:
        """P_t of this step, from the optimizer's state after it (module docstring)."""
        if self.kind in ("sgd", "momentum"):
            return torch.tensor(lr, dtype=torch.float64)
        step = float(state["step"])
        eps = group["eps"]
        if self.kind == "adam":
            beta1, beta2 = group["betas"]
            v = state["exp_avg_sq"].double() / (1.0 - beta2 ** step)
            return lr / (1.0 - beta1 ** step) / (v.sqrt() + eps)
        if self.kind == "adamax":
            return lr / (1.0 - group["betas"][0] ** step) / state["exp_inf"].double()
        if self.kind == "rmsprop":
            return lr / (state["square_avg"].double().sqrt() + eps)
        return lr / (state["sum"].double().sqrt() + eps)  # adagrad, lr_decay 0

    def window(self) -> dict[str, dict]:
        """``{BN name: {"reg": [...], "loss": [...]}}``, per channel, summed over the window; starts a new one."""
        out = {name: {part: self.sums[part][name].tolist() for part in ("reg", "loss")} for name in self.scales}
        for part in self.sums.values():
            for value in part.values():
                value.zero_()
        return out

    def state_dict(self) -> dict:
        return {"moment": {k: {n: v.clone() for n, v in d.items()} for k, d in self.moment.items()},
                "sums": {k: {n: v.clone() for n, v in d.items()} for k, d in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("moment", "sums"):
            for part, values in state[key].items():
                for name, value in values.items():
                    getattr(self, key)[part][name].copy_(value)
