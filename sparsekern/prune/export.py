"""Export a (pruned) model to ONNX and check it with onnxruntime.

    from sparsekern.prune.export import export_onnx, onnx_max_diff
    export_onnx(pruned, x, "pruned.onnx")              # torch.onnx.export(dynamo=True), batch dimension dynamic
    diff = onnx_max_diff("pruned.onnx", pruned, x)     # {"max_abs_diff", "output_scale", "max_rel_diff"}

The exporter is torch's default one since torch 2.9 (``torch.onnx.export(..., dynamo=True)``: the
model is captured with ``torch.export`` and translated by onnxscript), which works offline; the
TorchScript exporter (``dynamo=False``) is deprecated. A pruned model is an ordinary module of
smaller convs, BatchNorms and Linears (constants folded into biases), so it exports like the
original. Needs ``onnx`` and ``onnxscript`` (``pip install 'sparsekern[export]'``); the check needs
``onnxruntime`` too. A missing one is a MissingDependencyError naming the extra.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from sparsekern.errors import MissingDependencyError

EXTRA = "pip install 'sparsekern[export]'"


def _require(*modules: str, what: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"{what} needs {' and '.join(missing)}, which "
                                     f"{'is' if len(missing) == 1 else 'are'} not installed: {EXTRA}")


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export_onnx(model: nn.Module, example_inputs, path: Union[str, Path], *, dynamic_batch: bool = True,
                opset_version: Optional[int] = None, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("output",), verbose: bool = False) -> Path:
    """Write ``model`` (exported in eval mode, on the device of its parameters) to ``path`` as one ONNX
    file (weights inside it). ``example_inputs``: a tensor or a tuple of tensors; with
    ``dynamic_batch`` their first dimension is a free ``batch`` axis. torch's exporter progress is
    printed only with ``verbose``. Returns the path."""
    _require("onnx", "onnxscript", what="ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = _as_tuple(example_inputs)
    names = list(input_names)[: len(inputs)] + [f"input_{i}" for i in range(len(input_names), len(inputs))]
    dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in inputs) if dynamic_batch else None
    was_training = model.training
    model.eval()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet, warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), dynamo=True, external_data=False,
                              dynamic_shapes=dynamic_shapes, opset_version=opset_version, input_names=names,
                              output_names=list(output_names), verbose=verbose)
    finally:
        model.train(was_training)
    return path


def run_onnx(path: Union[str, Path], inputs) -> list:
    """Outputs (numpy arrays) of the ONNX model at ``path`` on ``inputs`` (tensors), with onnxruntime
    on the CPU."""
    _require("onnxruntime", what="running an ONNX model")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), _as_tuple(inputs))}
    return session.run(None, feeds)


@torch.no_grad()
def onnx_max_diff(path: Union[str, Path], model: nn.Module, inputs) -> dict:
    """How far onnxruntime's output of ``path`` is from ``model``'s (eval mode) on ``inputs``:
    {"max_abs_diff", "output_scale" (max |torch output|), "max_rel_diff" (diff / max(1, scale)),
    "samples"}. Only the first output is compared."""
    was_training = model.training
    model.eval()
    try:
        expected = model(*_as_tuple(inputs))
    finally:
        model.train(was_training)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = torch.from_numpy(run_onnx(path, inputs)[0])
    if tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"{path}: onnxruntime's output has shape {tuple(got.shape)}, torch's {tuple(expected.shape)}")
    diff = float((got.double() - expected.detach().cpu().double()).abs().max())
    scale = float(expected.detach().abs().max())
    return {"max_abs_diff": diff, "output_scale": scale, "max_rel_diff": diff / max(1.0, scale),
            "samples": int(_as_tuple(inputs)[0].shape[0])}
