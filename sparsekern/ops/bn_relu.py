"""bn_relu: inference BatchNorm + ReLU in one pass, with the sparsity measurement for free.

    y[n, c, p] = max(0, x[n, c, p] * scale[c] + shift[c])      (math in float32, y in x's dtype)
    m[n, c]    = max_p y[n, c, p]                              (float32, with return_max=True)

``scale``/``shift`` are the eval-mode BatchNorm affine (``bn_affine``). A channel marked in
``dead_mask`` is never read: y is 0 there and so is its max. NaN in x stays NaN in y (as
``torch.relu``) and makes m[n, c] NaN, so a broken activation is never mistaken for a dead one.

The module form, ``FusedBNReLU``, replaces an eval-mode ``BatchNorm + ReLU`` pair and can hand
each batch's m to a callback (e.g. a ChannelStats); ``fuse_bn_relu`` finds such pairs in a
model's torch.fx graph (Sequential pairs, module attributes, functional ReLUs) and swaps them. A BatchNorm is any of ``sparsekern._types.BATCH_NORMS``
(BatchNorm1d/2d/3d, SyncBatchNorm): in eval mode each is the same per-channel affine.

``fold_bn`` is the old name of ``bn_affine`` (deprecated; ``sparsekern.prune.fold_bn`` is
something else: a copy of a model with its BatchNorms folded into the layers before them).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sparsekern import _backend
from sparsekern._fx import trace_graph
from sparsekern._deprecated import deprecated_names
from sparsekern._layout import DTYPE_CODE, View4, as_view4, check_activation
from sparsekern._types import is_batch_norm
from sparsekern.errors import UntraceableModelError

OP = "bn_relu"


def _check_params(x: torch.Tensor, scale, shift, dead_mask):
    """Validate the per-channel parameters; return (scale, shift) as contiguous fp32 and the mask as uint8."""
    c = x.shape[1]
    converted = []
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},) to match x's {c} channels, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}")
        converted.append(t.to(torch.float32).contiguous())
    dead = None
    if dead_mask is not None:
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool:
            got = dead_mask.dtype if isinstance(dead_mask, torch.Tensor) else type(dead_mask).__name__
            raise TypeError(f"{OP}: dead_mask must be a bool tensor, got {got}")
        if tuple(dead_mask.shape) != (c,):
            raise ValueError(
                f"{OP}: dead_mask must have shape ({c},) to match x's {c} channels, got {tuple(dead_mask.shape)}"
            )
        if dead_mask.device != x.device:
            raise ValueError(f"{OP}: dead_mask is on {dead_mask.device} but x is on {x.device}")
        dead = dead_mask.to(torch.uint8).contiguous()
    return converted[0], converted[1], dead


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dim that has more than one element (others never address memory)."""
    return all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size > 1)


def _allocate_output(x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format when x is dense (empty_like keeps its strides), contiguous otherwise."""
    y = torch.empty_like(x)
    if _same_layout(x, y):
        return y
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _output_view(x: torch.Tensor, vx: View4, y: torch.Tensor) -> View4:
    """y's strides in x's (N, C, R, L) decomposition (y has x's strides, or is contiguous)."""
    if _same_layout(x, y):
        return View4(vx.n, vx.c, vx.r, vx.l, y.stride(0), y.stride(1), vx.sr, vx.sl)
    # Contiguous y: the folded trailing dims are in row-major order, so (r, l) -> r * L + l.
    return View4(vx.n, vx.c, vx.r, vx.l, vx.c * vx.r * vx.l, vx.r * vx.l, vx.l, 1)


def bn_relu_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dead_mask: Optional[torch.Tensor] = None,
    return_max: bool = False,
):
    """Pure-torch definition; the oracle the kernels are tested against, and the last fallback."""
    n, c = x.shape[0], x.shape[1]
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    s = scale.to(device=x.device, dtype=torch.float32).reshape(per_channel)
    b = shift.to(device=x.device, dtype=torch.float32).reshape(per_channel)
    y32 = torch.relu(x.to(torch.float32) * s + b)
    if dead_mask is not None:
        # where() picks 0 whatever the computed value is, so NaN in a dead channel never leaks.
        y32 = torch.where(dead_mask.to(device=x.device, dtype=torch.bool).reshape(per_channel), 0.0, y32)
    y = _allocate_output(x)
    y.copy_(y32)
    if not return_max:
        return y
    return y, _max_of(y)


def _max_of(y: torch.Tensor) -> torch.Tensor:
    """The (N, C) float32 max of y over its positions (0 where there are none; NaN propagates)."""
    n, c = y.shape[0], y.shape[1]
    flat = y.reshape(n, c, math.prod(y.shape[2:]))
    if flat.shape[2] == 0:
        return torch.zeros(n, c, dtype=torch.float32, device=y.device)
    return flat.amax(dim=2).to(torch.float32)  # amax propagates NaN, which is the contract


# ---------------------------------------------------------------- the kernels, as torch.library ops
#
# Three ops in the sparsekern namespace, over the torch-free pointer ABI of sparsekern._C (or
# Triton, or the reference): torch.compile sees each as one opaque node with a fake (meta)
# implementation, so a compiled model keeps them in its graph (no graph break). Arguments are
# already validated by ``bn_relu`` (scale / shift contiguous float32, dead a contiguous uint8 (C,)
# or None). Each returns m: the (N, C) float32 max when return_max, else an empty (0,) tensor.
#   sparsekern::bn_relu(x, scale, shift, dead, return_max, backend) -> (y, m)      functional
#   sparsekern::bn_relu_out(x, scale, shift, dead, out!, return_max, write_dead, backend) -> m
#   sparsekern::bn_relu_(x!, scale, shift, dead, return_max, write_dead, backend) -> m   in place


def _no_max(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=x.device)


def _new_max(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)


def _run_kernel(chosen: str, x: torch.Tensor, scale32, shift32, dead, y: torch.Tensor, return_max: bool,
                write_dead: bool) -> torch.Tensor:
    """Fill y (x's shape and dtype; x's strides or contiguous, or x itself) with a kernel; return m."""
    if x.numel() == 0 or chosen == "torch":
        ref = bn_relu_reference(x, scale32, shift32, dead, return_max)
        y_ref, m = ref if return_max else (ref, None)
        if y_ref is not y:
            y.copy_(y_ref)
        return m if return_max else _no_max(x)
    xv, vx = as_view4(x)
    if xv is not x and xv.data_ptr() != x.data_ptr():
        # x's dims do not fold into (N, C, R, L): xv is a copy, which y cannot alias.
        if y.data_ptr() == x.data_ptr():
            tmp = torch.empty_like(xv)
            m = _run_kernel(chosen, xv, scale32, shift32, dead, tmp, return_max, True)
            y.copy_(tmp)
            return m
    if y.data_ptr() == x.data_ptr():
        vy = vx  # in place: y is x
    elif _same_layout(xv, y) or y.is_contiguous():
        vy = _output_view(xv, vx, y)
    else:  # an out= of some other layout: compute into x's layout, then copy
        tmp = _allocate_output(xv)
        m = _run_kernel(chosen, xv, scale32, shift32, dead, tmp, return_max, True)
        y.copy_(tmp)
        return m
    out_max = _new_max(x) if return_max else None
    dead_ptr = dead.data_ptr() if dead is not None else 0
    max_ptr = out_max.data_ptr() if out_max is not None else 0
    y_strides = (vy.sn, vy.sc, vy.sr, vy.sl)
    with _backend.cuda_device(x):  # every kernel launches on the current device: make it x's
        if chosen == "cpp":
            _backend.extension().bn_relu_cpu(
                xv.data_ptr(), DTYPE_CODE[x.dtype], *vx.args(), scale32.data_ptr(), shift32.data_ptr(), dead_ptr,
                y.data_ptr(), *y_strides, max_ptr, write_dead,
            )
        elif chosen == "cuda":
            _backend.extension().bn_relu_cuda(
                xv.data_ptr(), DTYPE_CODE[x.dtype], *vx.args(), scale32.data_ptr(), shift32.data_ptr(), dead_ptr,
                y.data_ptr(), *y_strides, max_ptr, _backend.cuda_stream_ptr(x), write_dead,
            )
        else:  # triton, imported on first use (an optional dependency)
            from sparsekern.triton.bn_relu import bn_relu_triton

            bn_relu_triton(xv, vx, scale32, shift32, dead, y, vy, out_max, write_dead=write_dead)
    return out_max if return_max else _no_max(x)


@torch.library.custom_op("sparsekern::bn_relu", mutates_args=())
def _bn_relu_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dead: Optional[torch.Tensor],
                return_max: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = _backend.resolve(backend, x.device, op=OP)
    y = _allocate_output(x)
    return y, _run_kernel(chosen, x, scale, shift, dead, y, return_max, True)


@_bn_relu_op.register_fake
def _(x, scale, shift, dead, return_max, backend):
    return _allocate_output(x), (_new_max(x) if return_max else _no_max(x))


@torch.library.custom_op("sparsekern::bn_relu_out", mutates_args=("out",))
def _bn_relu_out_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dead: Optional[torch.Tensor],
                    out: torch.Tensor, return_max: bool, write_dead: bool, backend: str) -> torch.Tensor:
    chosen = _backend.resolve(backend, x.device, op=OP)
    return _run_kernel(chosen, x, scale, shift, dead, out, return_max, write_dead)


@_bn_relu_out_op.register_fake
def _(x, scale, shift, dead, out, return_max, write_dead, backend):
    return _new_max(x) if return_max else _no_max(x)


@torch.library.custom_op("sparsekern::bn_relu_", mutates_args=("x",))
def _bn_relu_inplace_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dead: Optional[torch.Tensor],
                        return_max: bool, write_dead: bool, backend: str) -> torch.Tensor:
    chosen = _backend.resolve(backend, x.device, op=OP)
    return _run_kernel(chosen, x, scale, shift, dead, x, return_max, write_dead)


@_bn_relu_inplace_op.register_fake
def _(x, scale, shift, dead, return_max, write_dead, backend):
    return _new_max(x) if return_max else _no_max(x)


def _check_out(x: torch.Tensor, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{OP}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"{OP}: out must match x's shape, dtype and device ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )


def bn_relu(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dead_mask: Optional[torch.Tensor] = None,
    return_max: bool = False,
    backend: str = "auto",
    *,
    out: Optional[torch.Tensor] = None,
    inplace: bool = False,
    write_dead: bool = True,
):
    """Fused inference BatchNorm + ReLU: ``relu(x * scale[c] + shift[c])`` per channel c.

    x: (N, C), (N, C, L), (N, C, H, W) or higher rank; float32, float16 or bfloat16;
    contiguous, channels_last or any strided view. scale, shift: (C,) floating tensors on x's
    device (see ``bn_affine``). dead_mask: optional bool (C,); those channels are not read and
    come out as 0. backend: auto|cuda|triton|cpp|torch.

    Where y goes:
    - default: a new tensor (x's dtype; x's memory format when x is dense, contiguous otherwise);
    - ``out=``: into this preallocated tensor (x's shape, dtype and device; any strides) and
      returns it: no allocation, which on CPU is most of the cost of a new 64 MiB output;
    - ``inplace=True``: into x itself (returned); x must not need grad.

    write_dead (with ``out=`` or ``inplace``): ``True`` (default) writes 0 into every dead channel.
    ``False`` says the output already holds 0 there, so the dead channels are neither read nor
    written (whole dead rows / vectors of channels; a vector mixing dead and live channels still
    writes its zeros): exact for an ``out=`` buffer reused from call to call, its dead channels
    zeroed once (by a first call with write_dead=True). In place it leaves x's own values in the
    dead channels (or 0), which is what you want only when nothing reads them.

    Returns y or, with ``return_max=True``, ``(y, m)`` where m is the (N, C) float32 max of y over
    all positions (NaN where that (n, c) saw a NaN), computed in the same pass. Every form is a
    ``torch.library`` op (``torch.ops.sparsekern.bn_relu`` / ``bn_relu_out`` / ``bn_relu_``), so
    ``torch.compile(fullgraph=True)`` traces through it.
    """
    check_activation(x, OP)
    scale32, shift32, dead = _check_params(x, scale, shift, dead_mask)
    if out is not None and inplace:
        raise ValueError(f"{OP}: give out= or inplace=True, not both")
    if out is not None:
        _check_out(x, out)
        if out is x or (not torch.compiler.is_compiling() and x.numel() > 0 and out.data_ptr() == x.data_ptr()):
            inplace, out = True, None  # out=x is the in-place form (a mutated op cannot alias an input)
    if not isinstance(write_dead, bool):
        raise TypeError(f"{OP}: write_dead must be a bool, got {type(write_dead).__name__}")
    if not write_dead and out is None and not inplace:
        raise ValueError(f"{OP}: write_dead=False needs out= or inplace=True (a new output holds no zeros yet)")
    if not torch.compiler.is_compiling():
        chosen = _backend.resolve(backend, x.device, op=OP)  # an unavailable explicit backend raises here
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, scale, shift))
        if chosen == "torch" and out is None and not inplace:
            return bn_relu_reference(x, scale32, shift32, dead, return_max)  # differentiable
        if needs_grad:
            # The kernels have no backward: returning a detached y would silently cut the graph.
            raise RuntimeError(
                f"{OP}: the {chosen} kernel is inference-only (no autograd), but an input requires grad; "
                "call it under torch.no_grad() / torch.inference_mode(), or pass backend='torch'"
                + (" (without out= / inplace)" if out is not None or inplace else "")
            )
    if inplace:
        m = torch.ops.sparsekern.bn_relu_(x, scale32, shift32, dead, return_max, write_dead, backend)
        y = x
    elif out is not None:
        m = torch.ops.sparsekern.bn_relu_out(x, scale32, shift32, dead, out, return_max, write_dead, backend)
        y = out
    else:
        y, m = torch.ops.sparsekern.bn_relu(x, scale32, shift32, dead, return_max, backend)
    return (y, m) if return_max else y


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode affine of one BatchNorm as float32 (scale, shift), computed in float64.

    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale. ``bn`` is any
    BatchNorm (``sparsekern._types.BATCH_NORMS``: BatchNorm1d/2d/3d, SyncBatchNorm); its mode
    does not matter here, the affine is what it computes in eval mode.
    """
    if not is_batch_norm(bn):
        raise TypeError(
            f"bn_affine: expected a BatchNorm (BatchNorm1d/2d/3d or SyncBatchNorm), got {type(bn).__name__}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn_affine: this BatchNorm has no running statistics (track_running_stats=False), so its eval-mode "
            "output depends on the batch and cannot be folded into a per-channel affine"
        )
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        raise ValueError(f"bn_affine: this {type(bn).__name__} is not initialised yet (run one batch through it)")
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    if not bool(torch.isfinite(mean).all()) or not bool(torch.isfinite(var).all()):
        raise ValueError("bn_affine: the BatchNorm's running_mean / running_var contain NaN or Inf")
    if bool((var + bn.eps <= 0).any()):
        raise ValueError("bn_affine: running_var + eps must be positive in every channel")
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    shift = beta - mean * scale
    return scale.to(torch.float32), shift.to(torch.float32)


class FusedBNReLU(nn.Module):
    """An eval-mode BatchNorm (any of ``BATCH_NORMS``) followed by ``ReLU``, in one pass (``bn_relu``).

    Buffers: ``scale``, ``shift`` (float32, (C,)) and ``dead_mask`` (bool (C,) or None).
    With ``record_max=True`` each forward also computes m = per-(n, c) max of the output
    (same pass), keeps it in ``last_max`` and passes it to ``on_max`` if given (for example a
    function that feeds it to a ChannelStats). Only inference is supported: the module
    starts in eval mode and refuses to run in training mode, since it has no batch statistics.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor,
        dead_mask: Optional[torch.Tensor] = None,
        *,
        record_max: bool = False,
        on_max: Optional[Callable[[torch.Tensor], None]] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if scale.dim() != 1 or shift.shape != scale.shape:
            raise ValueError(
                "FusedBNReLU: scale and shift must both have shape (C,), "
                f"got {tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        if not bool(torch.isfinite(scale).all()) or not bool(torch.isfinite(shift).all()):
            raise ValueError("FusedBNReLU: scale / shift contain NaN or Inf")
        if dead_mask is not None and (dead_mask.dtype != torch.bool or dead_mask.shape != scale.shape):
            raise ValueError(
                f"FusedBNReLU: dead_mask must be a bool tensor of shape {tuple(scale.shape)}, "
                f"got {dead_mask.dtype} {tuple(dead_mask.shape)}"
            )
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("shift", shift.detach().to(torch.float32).clone())
        self.register_buffer("dead_mask", None if dead_mask is None else dead_mask.detach().clone())
        self.record_max = record_max
        self.on_max = on_max
        self.backend = backend
        self.last_max: Optional[torch.Tensor] = None
        self.train(False)

    @classmethod
    def from_bn(cls, bn: nn.Module, dead_mask: Optional[torch.Tensor] = None, **kwargs) -> "FusedBNReLU":
        """Build from an eval-mode BatchNorm (``bn_affine``'s kinds; the ReLU after it is implied)."""
        if isinstance(bn, nn.Module) and bn.training:
            raise ValueError(
                "FusedBNReLU.from_bn: the BatchNorm is in training mode; fusing uses its running statistics, "
                "so call model.eval() first"
            )
        scale, shift = bn_affine(bn)
        if dead_mask is not None:
            dead_mask = dead_mask.to(scale.device)
        return cls(scale, shift, dead_mask, **kwargs)

    @property
    def num_features(self) -> int:
        return self.scale.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(BN(x)) with the folded statistics; records the per-(n, c) max when asked."""
        if self.training:
            raise RuntimeError(
                "FusedBNReLU runs in eval mode only: it folds the running statistics and cannot compute batch "
                "statistics for training; call .eval(), or train the unfused BatchNorm + ReLU"
            )
        want_max = self.record_max or self.on_max is not None
        out = bn_relu(x, self.scale, self.shift, self.dead_mask, return_max=want_max, backend=self.backend)
        if not want_max:
            return out
        y, m = out
        self.last_max = m
        if self.on_max is not None:
            self.on_max(m)
        return y

    def extra_repr(self) -> str:
        dead = 0 if self.dead_mask is None else int(self.dead_mask.sum())
        return f"{self.num_features}, dead={dead}, record_max={self.record_max}, backend={self.backend!r}"


def _fusable(module: nn.Module) -> bool:
    """A BatchNorm whose eval-mode output is a per-channel affine (it has running statistics)."""
    return is_batch_norm(module) and module.running_var is not None


_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_RELU_METHODS = ("relu", "relu_")


def _is_relu_of(node: torch.fx.Node, source: torch.fx.Node, modules: dict) -> bool:
    """``node`` is a plain ReLU (nn.ReLU module, F.relu / torch.relu / their in-place forms, or
    Tensor.relu) applied to ``source``."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def find_bn_relu_pairs(graph: torch.fx.Graph, modules: dict) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The fusable (BatchNorm call, ReLU call) node pairs of a traced graph, in graph order.

    A pair is a call of a fusable BatchNorm module whose output has exactly one user, a ReLU of it.
    Not a pair: a BN whose output also feeds something else (the ReLU cannot absorb it), and in
    particular the BN before a residual add: ``relu(bn(x) + identity)`` applies the ReLU to the
    sum, not to the BN output, so fusing it would change the result. A BN module called more than
    once is fused only if every one of its calls is a pair.
    """
    pairs, calls = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not _fusable(modules.get(node.target)):
            continue
        calls[node.target] = calls.get(node.target, 0) + 1
        users = list(node.users)
        if len(users) == 1 and _is_relu_of(users[0], node, modules):
            pairs.append((node, users[0]))
    paired = {}
    for bn, _ in pairs:
        paired[bn.target] = paired.get(bn.target, 0) + 1
    return [(bn, relu) for bn, relu in pairs if paired[bn.target] == calls[bn.target]]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _fuse_sequential_pairs(model: nn.Module, **kwargs) -> nn.Module:
    """Without a graph: each BatchNorm immediately followed by an nn.ReLU inside an nn.Sequential."""
    sequentials = [m for m in model.modules() if isinstance(m, nn.Sequential)]  # listed before any change
    for container in sequentials:
        names = list(container._modules.keys())
        for first, second in zip(names, names[1:]):
            bn, relu = container._modules[first], container._modules[second]
            if _fusable(bn) and type(relu) is nn.ReLU:
                container._modules[first] = FusedBNReLU.from_bn(bn, **kwargs)
                container._modules[second] = nn.Identity()
    return model


def fuse_bn_relu(model: nn.Module, *, leaf_modules=(), concrete_args: Optional[dict] = None, **kwargs) -> nn.Module:
    """Replace every BatchNorm whose output goes only into a ReLU by one ``FusedBNReLU``.

    The pairs are found in the model's torch.fx graph (``sparsekern._fx.trace_graph``;
    ``leaf_modules`` / ``concrete_args`` as there), wherever they are: consecutive modules of an
    nn.Sequential, module attributes called in ``forward`` (torchvision ResNet's ``bn1`` /
    ``relu``), or a BN followed by ``F.relu`` / ``torch.relu`` / ``Tensor.relu``. The BN before a
    residual add is not fused: the ReLU after the add applies to the sum (``find_bn_relu_pairs``).
    A BatchNorm without running statistics is left alone. ``kwargs`` go to every FusedBNReLU
    (``record_max``, ``on_max``, ``backend``). The model must be in eval mode.

    The model is modified in place: each fused BN becomes a FusedBNReLU under the same name, and
    an nn.ReLU module that only ever follows fused BNs becomes nn.Identity. When that removes
    every fused ReLU (each pair's ReLU is a module of its own), the model itself is returned.
    Otherwise (a functional ReLU, or a ReLU module shared with other uses, as in torchvision's
    blocks, whose ``self.relu`` also follows the residual add) the returned model is a
    ``torch.fx.GraphModule`` of it without those ReLU calls; the model modified in place still
    computes the same (ReLU after FusedBNReLU changes nothing), but does the redundant pass.
    Always use the returned model. Its submodules keep their qualified names (``layer1.0.bn1``).
    A model torch.fx cannot trace falls back to the nn.Sequential pairs alone, with a warning.
    """
    try:
        gm = trace_graph(model, leaf_modules, concrete_args, is_leaf=lambda m, _name: isinstance(m, FusedBNReLU))
    except UntraceableModelError as exc:
        warnings.warn(f"fuse_bn_relu: {exc}; fusing the BN + ReLU pairs of its nn.Sequential containers only",
                      RuntimeWarning, stacklevel=2)
        return _fuse_sequential_pairs(model, **kwargs)
    modules = dict(gm.named_modules())
    pairs = find_bn_relu_pairs(gm.graph, modules)
    if not pairs:
        return model
    fused = {}
    for bn_node, _ in pairs:
        if bn_node.target not in fused:
            fused[bn_node.target] = FusedBNReLU.from_bn(modules[bn_node.target], **kwargs)  # raises in training mode
    # ReLU modules whose every call is the ReLU of a pair: Identity in the model itself.
    relu_calls, relu_paired = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
            relu_calls[node.target] = relu_calls.get(node.target, 0) + 1
    for _, relu_node in pairs:
        if relu_node.op == "call_module":
            relu_paired[relu_node.target] = relu_paired.get(relu_node.target, 0) + 1
    dedicated = [name for name, k in relu_paired.items() if k == relu_calls[name]]
    for name, module in fused.items():
        _set_submodule(model, name, module)
    for name in dedicated:
        _set_submodule(model, name, nn.Identity())
    if all(relu.op == "call_module" and relu.target in dedicated for _, relu in pairs):
        return model
    graph = gm.graph
    for bn_node, relu_node in pairs:
        relu_node.replace_all_uses_with(bn_node)
        graph.erase_node(relu_node)
    graph.lint()
    out = torch.fx.GraphModule(model, graph, type(model).__name__)
    out.eval()
    return out


# The old name of bn_affine (a release of warning first): fold_bn now means sparsekern.prune.fold_bn.
__getattr__ = deprecated_names(__name__, {"fold_bn": bn_affine})
