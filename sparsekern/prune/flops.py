"""Parameter and compute counts of a model at a given input size.

Compute is counted as multiply-accumulates (MACs) of the Conv and Linear layers only, per
sample, the convention of the pruning papers (Li et al. 2017 and Liu et al. 2017 call these
"FLOPs": VGG-16 on 32x32 inputs is ~3.1e8 of them). ``count_flops`` returns 2 * MACs (one
multiply and one add each). Bias additions, BatchNorm, activations and pooling are not
counted: they are a small fraction and pruning shrinks them in proportion anyway.

- Conv (incl. grouped/depthwise): output elements * (in_channels / groups) * kernel volume.
- ConvTranspose: input elements * (out_channels / groups) * kernel volume.
- Linear: output elements * in_features.

The counts come from forward hooks on one zero-filled sample, so any model that runs works
(no tracing needed); a module called twice counts twice. ``graph_macs`` computes the same
count without running anything, from the shapes a ``ShapeProp`` pass left on an fx graph.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats not included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _sample(model: nn.Module, input_shape) -> tuple:
    shape = tuple(input_shape)
    if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"input_shape must be a full input shape with a batch dim, e.g. (1, 3, 32, 32), got {input_shape!r}"
        )
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return (torch.zeros((1,) + shape[1:], device=device, dtype=dtype),)


def _layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def macs_by_layer(model: nn.Module, inputs: tuple) -> dict:
    """Module name -> MACs of that Conv/Linear for ``inputs`` (a tuple of tensors), in eval mode.

    The counts are for the batch given; pass one sample to get per-sample numbers.
    """
    counts: dict = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            def hook(m, args, out, name=name):
                counts[name] = counts.get(name, 0) + _layer_macs(m, args, out)

            handles.append(module.register_forward_hook(hook))
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for name, m in model.named_modules():
            m.training = modes[name]
    return counts


def graph_macs(gm, root: nn.Module = None) -> int:
    """Conv/Linear MACs per sample of a traced model whose nodes carry ``ShapeProp`` shapes.

    The layer sizes are read from the modules of ``root`` (default: ``gm``'s own), so passing a
    pruned copy of the traced model counts the pruned model: removing channels does not change
    spatial sizes, only channel counts."""
    root = gm if root is None else root
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = root.get_submodule(node.target)
        out = node.meta.get("tensor_meta")
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or out is None:
            continue
        if isinstance(m, nn.Linear):
            total += math.prod(out.shape[1:-1]) * m.out_features * m.in_features
        elif m.transposed:
            spatial = math.prod(node.args[0].meta["tensor_meta"].shape[2:])
            total += spatial * m.in_channels * (m.out_channels // m.groups) * math.prod(m.kernel_size)
        else:
            total += math.prod(out.shape[2:]) * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return total


def macs_of(model: nn.Module, inputs: tuple) -> int:
    """Total Conv/Linear MACs for ``inputs`` (a tuple of tensors)."""
    return sum(macs_by_layer(model, inputs).values())


def count_macs(model: nn.Module, input_shape) -> int:
    """Conv/Linear multiply-accumulates per sample for inputs of ``input_shape`` (batch dim
    included, e.g. (1, 3, 32, 32); the batch size is ignored)."""
    return macs_of(model, _sample(model, input_shape))


def count_flops(model: nn.Module, input_shape) -> int:
    """2 * :func:`count_macs`: floating-point operations of the Conv/Linear layers per sample."""
    return 2 * count_macs(model, input_shape)
