"""The optimizer, regulariser and learning-rate schedule of a run, built from its config.

Regularisers come from ``sparsekern.regularize`` and share its one interface (``weight_decay``
for the optimizer, ``step(lr)`` after every optimizer step, a state_dict): ``reg=`` none, ``l2``
(the penalty in the gradient: torch's ``weight_decay``), ``wd`` (decoupled decay following the
lr schedule; both described in ``sparsekern.regularize.decay``), ``slimming`` (Network Slimming's
L1 on BN gammas, no L2) and the proximal ones (cges, lasso, group-lasso, ridge: a prox step after
every optimizer step). More plug in by name through ``register_regularizer``, optimizers through
``register_optimizer``.

Which parameters are regularised: all of them by default (conv and linear weights and biases,
BatchNorm gamma and beta), as in the paper; ``reg_bn=False`` exempts normalisation layers. The
proximal regularisers act on the conv / linear weights they select themselves (``reg_bn`` does
not apply), Slimming on the BN gammas.

Split LBI (``--optimizer slbi``, ``sparsekern.regularize.SplitLBI``) steps every conv / Linear
weight as W <- W - kappa*lr*(grad + (W - Gamma)/nu) with its sparse Gamma (conv: per filter;
Linear: per weight, or per row with ``slbi-group``), biases by SGD. ``momentum`` averages the loss
gradient only (as in the authors' DessiLBI code, whose default is 0.9; 0 gives SCIENCE.md section 4's
update exactly) and an L2 ``reg`` enters that gradient too. ``Optimization.end_epoch`` records
which units are in Gamma's support after each epoch (the pruning ranking), and all of it is in the
optimizer's state_dict, so it is checkpointed and resumed like any other optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from sparsekern.regularize import (
    REGULARIZERS as PROXIMAL,
    DecoupledWeightDecay,
    L2Regularizer,
    Regularizer,
    SlimmingRegularizer,
    SplitLBI,
    make_regularizer,
)
from sparsekern.train.mechanism import UpdateSplit, batchnorm_scales

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

# A run's config is a train.config.RunConfig; it is not imported here because config.py validates
# names against these registries (config imports optim, not the reverse).
RunConfig = Any
RegularizerFactory = Callable[[RunConfig, nn.Module, "list[nn.Parameter]"], Regularizer]
OptimizerFactory = Callable[[list, RunConfig], torch.optim.Optimizer]


def _no_regularizer(config: RunConfig, model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    return Regularizer()


def _l2(config: RunConfig, model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    return L2Regularizer(config.reg_strength)


def _decoupled(config: RunConfig, model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    return DecoupledWeightDecay(params, config.reg_strength, lr0=config.lr)


def _slimming(config: RunConfig, model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    return SlimmingRegularizer(model, config.reg_strength)


def _proximal(config: RunConfig, model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    return make_regularizer(config.reg, model, config.reg_strength)


_REGULARIZERS: dict[str, RegularizerFactory] = {
    "none": _no_regularizer,
    "l2": _l2,
    "wd": _decoupled,
    "slimming": _slimming,
}
for _name in PROXIMAL:
    _REGULARIZERS.setdefault(_name, _proximal)  # the built-in none keeps its meaning

_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr),
    "momentum": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
    "adamax": lambda groups, c: torch.optim.Adamax(groups, lr=c.lr),
    "adagrad": lambda groups, c: torch.optim.Adagrad(groups, lr=c.lr),
    "adadelta": lambda groups, c: torch.optim.Adadelta(groups, lr=c.lr),
    "rmsprop": lambda groups, c: torch.optim.RMSprop(groups, lr=c.lr),
}


def _split_lbi(fc_mode: str) -> OptimizerFactory:
    def build(groups, c):
        return SplitLBI(groups, lr=c.lr, kappa=c.slbi_kappa, nu=c.slbi_nu, momentum=c.momentum, fc_mode=fc_mode,
                        conv_mode="filter")

    return build


_OPTIMIZERS["slbi"] = _split_lbi("elementwise")  # S-P: conv filters, single Linear weights
_OPTIMIZERS["slbi-group"] = _split_lbi("group")  # GS-P: conv filters, Linear rows


def register_regularizer(name: str, factory: RegularizerFactory) -> None:
    """Make ``reg=name`` available: ``factory(config, model, regularised_params) -> Regularizer``."""
    _REGULARIZERS[name] = factory


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Make ``optimizer=name`` available: ``factory(param_groups, config) -> torch Optimizer``."""
    _OPTIMIZERS[name] = factory


def regularizer_names() -> list[str]:
    return list(_REGULARIZERS)


def optimizer_names() -> list[str]:
    return list(_OPTIMIZERS)


def split_parameters(model: nn.Module, reg_bn: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(regularised, exempt) trainable parameters; normalisation layers are exempt unless ``reg_bn``."""
    exempt_ids = set()
    if not reg_bn:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                exempt_ids.update(id(p) for p in module.parameters(recurse=False))
    regularised, exempt = [], []
    for p in model.parameters():
        if p.requires_grad:
            (exempt if id(p) in exempt_ids else regularised).append(p)
    return regularised, exempt


class ScheduleFactor:
    """lr_t / lr_0 as a function of the step t (a picklable object, so LambdaLR saves it)."""

    def __init__(self, kind: str, total_steps: int, milestones=(0.5, 0.75), decay: float = 0.1):
        self.kind = kind
        self.total_steps = int(total_steps)
        self.milestone_steps = [int(round(m * total_steps)) for m in milestones]
        self.decay = float(decay)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.decay ** sum(step >= m for m in self.milestone_steps)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        raise ValueError(f"unknown lr schedule {self.kind!r}")


class Optimization:
    """Optimizer + LR schedule + regulariser, stepped together once per training step."""

    def __init__(self, config: RunConfig, model: nn.Module, total_steps: int):
        # The config was validated against the registries (plug-ins included) when it was built.
        regularised, exempt = split_parameters(model, config.reg_bn)
        self.regularizer = _REGULARIZERS[config.reg](config, model, regularised)
        groups = [{"params": regularised, "weight_decay": self.regularizer.weight_decay},
                  {"params": exempt, "weight_decay": 0.0}]
        self.optimizer = _OPTIMIZERS[config.optimizer]([g for g in groups if g["params"]], config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            ScheduleFactor(config.lr_schedule, total_steps, config.lr_milestones, config.lr_decay),
        )
        # log_mechanism: each step's update of the BN scales split into loss and regulariser parts.
        self.update_split = None
        if config.log_mechanism:
            decayed = config.reg == "wd" and config.reg_bn
            self.update_split = UpdateSplit(self.optimizer, config.optimizer, batchnorm_scales(model),
                                            decoupled_strength=config.reg_strength if decayed else 0.0, lr0=config.lr)

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """optimizer.step(), then the regulariser's post-step with this step's lr, then advance the schedule."""
        lr = self.lr
        if self.update_split is not None:
            self.update_split.before_step()
        self.optimizer.step()
        if self.update_split is not None:
            self.update_split.after_step(lr)
        self.regularizer.step(lr)
        self.scheduler.step()

    def end_epoch(self, epoch: int) -> None:
        """Called after the last step of epoch ``epoch`` (0-based): Split LBI records its support."""
        record_epoch = getattr(self.optimizer, "record_epoch", None)
        if record_epoch is not None:
            record_epoch(epoch)

    def state_dict(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "regularizer": self.regularizer.state_dict(),
        }
        if self.update_split is not None:
            state["update_split"] = self.update_split.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.regularizer.load_state_dict(state["regularizer"])
        if self.update_split is not None:
            self.update_split.load_state_dict(state["update_split"])
