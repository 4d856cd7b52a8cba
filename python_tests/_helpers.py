"""Helpers shared by the test files (imported as ``from _helpers import ...``; pytest puts this
folder on sys.path). One copy of each, so the tests of one behaviour set it up the same way."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from torch import nn

from sparsekern import _backend


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial eval-mode BN statistics and affine, so constants after a BN are nonzero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean = torch.randn(c, generator=g) * 0.3
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model


def make_constant(bn: nn.Module, channels, beta: float) -> None:
    """gamma = 0: the BN outputs exactly beta on these channels (dead after ReLU if beta < 0)."""
    bn.weight.data[channels] = 0.0
    bn.bias.data[channels] = beta


@torch.no_grad()
def channel_peaks(model: nn.Module, modules, batches) -> dict:
    """{module name: per-channel max of that module's output over every batch}, from forward
    hooks: the independent reference for what the tracker and analyze measure. ``batches`` are
    input tensors; the model runs as it is (put it in eval mode first for inference statistics)."""
    peaks, handles = {}, []
    for name in modules:
        def hook(module, args, out, name=name):
            peak = out.transpose(0, 1).reshape(out.shape[1], -1).amax(1)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return peaks


def dead_channels(peaks: dict, threshold: float = 1e-12) -> dict:
    """{name: sorted channels whose peak is below ``threshold``} of a ``channel_peaks`` result."""
    return {name: torch.nonzero(p.double() < threshold).flatten().tolist() for name, p in peaks.items()}


# ---------------------------------------------------------------------------------------------
# Kernel backends: one table for the op tests (test_channel_absmax.py, test_bn_relu.py), each
# kind a backend argument forced explicitly on a device.

HAS_CUDA = torch.cuda.is_available()
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))
KERNEL_KINDS = {
    # kind: (backend argument, device, marks)
    "torch": ("torch", "cpu", ()),
    "cpp": ("cpp", "cpu", ()),
    "triton-interpret": ("triton", "cpu", (pytest.mark.triton_interpret,)),
    "cuda": ("cuda", "cuda", CUDA_MARKS),
    "triton-cuda": ("triton", "cuda", CUDA_MARKS),
}
# Where the Triton-interpreter cases run on a machine with a GPU (see conftest.py).
INTERPRETER_SUBPROCESS_TEST = "test_backend.py::test_triton_interpreter_cases_run_without_the_gpu"


def kind_params(kinds=tuple(KERNEL_KINDS)) -> list:
    """pytest params, one per kind, carrying the kind's marks and named by it."""
    return [pytest.param(kind, marks=KERNEL_KINDS[kind][2], id=kind) for kind in kinds]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def triton_interpreter_broken() -> str | None:
    """Why the installed triton's interpreter cannot run here at all, or None."""
    triton = pytest.importorskip("triton")
    # triton 3.6's interpreter turns 1-element arrays into ints with int(), which numpy >= 2.4
    # refuses; triton 3.8 fixed it. Not a sparsekern problem.
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return f"triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__}"
    return None


def prepare_kind(kind: str) -> tuple[str, torch.device]:
    """Skip what this machine (or this process) cannot run; return (backend argument, device)."""
    backend, device, _ = KERNEL_KINDS[kind]
    if backend in ("cpp", "cuda") and _backend.extension() is None:
        pytest.skip("sparsekern._C is not built")
    if kind == "cuda" and not getattr(_backend.extension(), "with_cuda", False):
        pytest.skip("sparsekern._C was built without CUDA kernels")
    if backend == "triton":
        pytest.importorskip("triton")
    if kind == "triton-interpret":
        from sparsekern.triton._utils import triton_interprets  # imports triton: only for Triton cases

        if not triton_interprets():
            pytest.skip("the Triton interpreter is off in this process (conftest.py turns it on only without a GPU, "
                        f"before triton is imported); on a GPU machine {INTERPRETER_SUBPROCESS_TEST} runs these cases")
        broken = triton_interpreter_broken()
        if broken:
            pytest.skip(broken)
    return backend, torch.device(device)


# ---------------------------------------------------------------------------------------------
# Distributed tests (test_analyze_distributed.py, test_stats_validation.py): ranks as processes.

REPO = Path(__file__).resolve().parents[1]


def run_ranks(script: str, world: int, tmp_path: Path, suffix: str, timeout: float = 300) -> list[Path]:
    """Run ``python script rank world init_file out_file`` for every rank at once (the script joins
    a torch.distributed group through the file store ``init_file``), and wait for all of them.

    Asserts that every rank exited 0, showing its output otherwise; a rank still running after
    ``timeout`` seconds is killed. Returns the ranks' out files, ``rank<r><suffix>`` in tmp_path.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    outs = [tmp_path / f"rank{r}{suffix}" for r in range(world)]
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(script), str(r), str(world), str(tmp_path / "store"),
                          str(outs[r])], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return outs


class PerPassLoader:
    """Yields passes[i] on its i-th iteration: a loader whose batches change between passes."""

    def __init__(self, *passes):
        self.passes = passes
        self.calls = 0

    def __iter__(self):
        self.calls += 1
        return iter(self.passes[self.calls - 1])
