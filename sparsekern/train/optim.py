"""Optimizers, L2 versus decoupled weight decay, and the learning-rate schedule.

The two regularisers the paper compares, for a parameter theta, lr_t = lr_0 * schedule(t):

  L2 ("l2"):  the penalty enters the gradient. Implemented as torch's ``weight_decay=lambda``
              on the optimizer, so g_t = grad + lambda * theta and an adaptive optimizer
              rescales the penalty together with the gradient (Adam divides it by sqrt(v_t)).
              For SGD: theta <- theta - lr_t * (grad + lambda * theta).

  WD ("wd"):  decoupled. The optimizer steps on the plain gradient, then
                  theta <- theta * (1 - lambda * lr_t / lr_0)
              so the per-step decay is lambda at the initial learning rate and follows the
              learning-rate schedule, as in the paper ("adjusted with the same scaling
              schedule as the learning rate"). With Adam this is AdamW with
              ``weight_decay = lambda / lr_0`` except for the order: AdamW decays *before* its
              update, we decay *after* it, so one step differs by exactly lambda_t * lr_t * u_t
              (u_t the Adam direction m_hat / (sqrt(v_hat) + eps)), a second-order term.

Which parameters are regularised: all of them by default (conv and linear weights and biases,
BatchNorm gamma and beta), as in the paper; ``reg_bn=False`` exempts normalisation layers.

More regularisers plug in by name through ``register_regularizer``, optimizers through
``register_optimizer``. The proximal regularisers of ``sparsekern.regularize`` (its
``REGULARIZERS``: cges, lasso, group-lasso, ridge) are registered automatically the first time
the names are listed: ``--reg cges`` runs their prox step after every optimizer step.
``--reg slimming`` is Network Slimming's L1 penalty on BN gammas (a gradient hook adding
``reg_strength * sign(gamma)``, see ``sparsekern.prune.baselines``) and no L2.

Split LBI (``--optimizer slbi``, ``sparsekern.regularize.SplitLBI``) steps every conv / Linear
weight as W <- W - kappa*lr*(grad + (W - Gamma)/nu) with its sparse Gamma (conv: per filter;
Linear: per weight, or per row with ``slbi-group``), biases by SGD. ``momentum`` averages the loss
gradient only (as in the authors' DessiLBI code, whose default is 0.9; 0 gives SCIENCE.md section 4's
update exactly) and an L2 ``reg`` enters that gradient too. ``Optimization.end_epoch`` records
which units are in Gamma's support after each epoch (the pruning ranking), and all of it is in the
optimizer's state_dict, so it is checkpointed and resumed like any other optimizer.

Nothing here synchronises with the device: the decay factor is a Python float computed from
the host-side learning rate.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from sparsekern.train.config import RunConfig

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class Regularizer:
    """No regularisation; the base class of every regulariser.

    ``weight_decay`` is the L2 coefficient handed to the torch optimizer for the regularised
    parameters; ``after_step`` runs after every ``optimizer.step()`` (decoupled decay,
    proximal steps). Subclasses keep any state they need in ``state_dict``.
    """

    weight_decay = 0.0

    def __init__(self, config: "RunConfig", model: nn.Module, params: list[nn.Parameter]):
        self.strength = config.reg_strength
        self.params = params

    def after_step(self, lr: float, lr0: float) -> None:
        """Called after each optimizer step with that step's learning rate and lr_0."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class L2Regularizer(Regularizer):
    """Penalty lambda/2 * ||theta||^2 in the loss, i.e. lambda * theta in the gradient."""

    @property
    def weight_decay(self) -> float:  # type: ignore[override]
        return self.strength


class DecoupledWeightDecay(Regularizer):
    """theta <- theta * (1 - lambda * lr_t / lr_0) after each step (decay follows the lr schedule)."""

    @torch.no_grad()
    def after_step(self, lr: float, lr0: float) -> None:
        if self.params:
            torch._foreach_mul_(self.params, 1.0 - self.strength * lr / lr0)


RegularizerFactory = Callable[["RunConfig", nn.Module, "list[nn.Parameter]"], Regularizer]
OptimizerFactory = Callable[[list, "RunConfig"], torch.optim.Optimizer]


def _slimming(config: "RunConfig", model: nn.Module, params: list[nn.Parameter]) -> Regularizer:
    """Network Slimming's L1 penalty on BN gammas (``sparsekern.prune.baselines``), no L2."""
    from sparsekern.prune.baselines import SlimmingRegularizer

    return SlimmingRegularizer(config, model, params)


_REGULARIZERS: dict[str, RegularizerFactory] = {
    "none": Regularizer,
    "l2": L2Regularizer,
    "wd": DecoupledWeightDecay,
    "slimming": _slimming,
}

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
        from sparsekern.regularize.slbi import SplitLBI

        return SplitLBI(groups, lr=c.lr, kappa=c.slbi_kappa, nu=c.slbi_nu, momentum=c.momentum, fc_mode=fc_mode,
                        conv_mode="filter")

    return build


_OPTIMIZERS["slbi"] = _split_lbi("elementwise")  # S-P: conv filters, single Linear weights
_OPTIMIZERS["slbi-group"] = _split_lbi("group")  # GS-P: conv filters, Linear rows

_plugins_loaded = False


class ProximalRegularizer(Regularizer):
    """A proximal regulariser of ``sparsekern.regularize`` (cges, lasso, group-lasso, ridge...):
    its prox step runs after every optimizer step, with that step's learning rate. It acts on
    the conv / linear weights it selects itself (``reg_bn`` does not apply)."""

    def __init__(self, config: "RunConfig", model: nn.Module, params: list[nn.Parameter]):
        super().__init__(config, model, params)
        from sparsekern.regularize import make_regularizer

        self.prox = make_regularizer(config.reg, model, config.reg_strength)

    def after_step(self, lr: float, lr0: float) -> None:
        self.prox.step(lr)


def _load_plugins() -> None:
    """Register the proximal regularisers of ``sparsekern.regularize`` under their names (once)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        import sparsekern.regularize as regularize

        for name in getattr(regularize, "REGULARIZERS", {}):
            _REGULARIZERS.setdefault(name, ProximalRegularizer)  # built-in none / l2 / wd keep their meaning


def register_regularizer(name: str, factory: RegularizerFactory) -> None:
    """Make ``reg=name`` available: ``factory(config, model, regularised_params) -> Regularizer``."""
    _REGULARIZERS[name] = factory


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Make ``optimizer=name`` available: ``factory(param_groups, config) -> torch Optimizer``."""
    _OPTIMIZERS[name] = factory


def regularizer_names() -> list[str]:
    _load_plugins()
    return list(_REGULARIZERS)


def optimizer_names() -> list[str]:
    _load_plugins()
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

    def __init__(self, config: "RunConfig", model: nn.Module, total_steps: int):
        # The config was validated against the registries (plug-ins included) when it was built.
        regularised, exempt = split_parameters(model, config.reg_bn)
        self.regularizer = _REGULARIZERS[config.reg](config, model, regularised)
        groups = [{"params": regularised, "weight_decay": self.regularizer.weight_decay},
                  {"params": exempt, "weight_decay": 0.0}]
        self.optimizer = _OPTIMIZERS[config.optimizer]([g for g in groups if g["params"]], config)
        self.lr0 = config.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            ScheduleFactor(config.lr_schedule, total_steps, config.lr_milestones, config.lr_decay),
        )

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """optimizer.step(), then the regulariser's post-step with this step's lr, then advance the schedule."""
        lr = self.lr
        self.optimizer.step()
        self.regularizer.after_step(lr, self.lr0)
        self.scheduler.step()

    def end_epoch(self, epoch: int) -> None:
        """Called after the last step of epoch ``epoch`` (0-based): Split LBI records its support."""
        record_epoch = getattr(self.optimizer, "record_epoch", None)
        if record_epoch is not None:
            record_epoch(epoch)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "regularizer": self.regularizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.regularizer.load_state_dict(state["regularizer"])
