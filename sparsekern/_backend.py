"""Which kernel backends exist on this machine, and which one an op call uses.

Backends, in the order ``auto`` tries them:
  cuda   - the CUDA C++ kernels in ``sparsekern._C`` (CUDA tensors; _C built with nvcc)
  triton - the Triton kernels (CUDA tensors; or CPU tensors when TRITON_INTERPRET=1)
  cpp    - the C++ CPU kernels in ``sparsekern._C`` (CPU tensors)
  torch  - the pure-torch reference (anything; always available)

``SPARSEKERN_BACKEND`` (auto|cuda|triton|cpp|torch) sets the default for calls that pass
``backend="auto"``. Nothing here touches a CUDA driver at import time.

The C++ CPU kernels are compiled for several instruction sets (baseline, avx2, avx512; or one
``native`` variant in a SPARSEKERN_NATIVE=1 build) and run the best one this CPU supports.
``SPARSEKERN_CPU_ISA`` (auto|baseline|avx2|avx512) asks for another: the tests use it to run
every variant on one machine. ``backends()["extension"]`` says which variants there are and
which one runs.

Device selection has one place, :func:`cuda_device`: every op wraps its kernel call in it
(CUDA extension and Triton alike), which makes the input's GPU the current device for the
call and gives the caller's back after. The kernels themselves (csrc/cuda/*.cu, the Triton
launchers) launch on the current device and the stream :func:`cuda_stream_ptr` names.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

import torch

from sparsekern.errors import BackendUnavailableError, CpuIsaError

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@lru_cache(maxsize=1)
def _load_extension():
    """Import sparsekern._C once; return (module or None, reason it failed or None)."""
    try:
        # By its full name: the compiled module itself, not a name from the package's __init__.
        _C = importlib.import_module("sparsekern._C")
    except ImportError as exc:
        reason = (
            f"sparsekern._C could not be loaded ({exc}); running on torch {torch.__version__}. "
            "It is built at install time when CMake, pybind11 and a C++ compiler are present "
            "(`pip install -v` shows why it was not); in a source tree, `pip install --no-build-isolation -e .`."
        )
        warnings.warn(
            f"{reason} Falling back to the pure-torch reference kernels (slow on CPU).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    _select_cpu_isa(_C)
    return _C, None


def _select_cpu_isa(ext) -> None:
    """Apply SPARSEKERN_CPU_ISA, if set, to the extension's CPU kernels (else they keep the best one)."""
    isa = os.environ.get("SPARSEKERN_CPU_ISA", "")
    if not isa:
        return
    try:
        ext.set_cpu_isa(isa)
    except ValueError as exc:
        raise CpuIsaError(f"SPARSEKERN_CPU_ISA={isa!r}: {exc}") from None


def extension():
    """The compiled extension module, or None if it did not build / load."""
    return _load_extension()[0]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_supports(backend: str, device: torch.device) -> tuple[bool, str]:
    """(can run, why not) for a backend on tensors living on ``device``."""
    if backend == "torch":
        return True, ""
    if backend == "cpp":
        ext = extension()
        if ext is None:
            return False, _load_extension()[1] or "sparsekern._C is not built"
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
        return True, ""
    if backend == "cuda":
        ext = extension()
        if ext is None:
            return False, _load_extension()[1] or "sparsekern._C is not built"
        if not getattr(ext, "with_cuda", False):
            return False, "sparsekern._C was built without CUDA kernels (nvcc not found or SPARSEKERN_CUDA=0)"
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return True, ""
    if backend == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpret():
            return True, ""
        return False, (
            f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got a {device.type} tensor"
        )
    raise ValueError(f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")


def resolve(backend: str, device: torch.device, *, op: str) -> str:
    """Pick the backend for one call. Explicit requests never fall back silently."""
    if backend == "auto":
        backend = os.environ.get("SPARSEKERN_BACKEND", "auto")
    if backend != "auto":
        ok, why = backend_supports(backend, device)
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if backend_supports(candidate, device)[0]:
            return candidate
    return "torch"


def backends() -> dict:
    """What is available here, and what sparsekern._C was built with."""
    ext = extension()
    cuda_ok = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "triton": None,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "extension": None if ext is None else _extension_info(ext),
        "extension_error": _load_extension()[1],
        "available": {
            "cpu": [b for b in ("cpp", "torch") if backend_supports(b, torch.device("cpu"))[0]]
            + (["triton"] if backend_supports("triton", torch.device("cpu"))[0] else []),
            "cuda": [b for b in BACKENDS if backend_supports(b, torch.device("cuda"))[0]] if cuda_ok else [],
        },
        "default": os.environ.get("SPARSEKERN_BACKEND", "auto"),
    }
    if triton_importable():
        import triton

        info["triton"] = triton.__version__
    return info


def _extension_info(ext) -> dict:
    """How sparsekern._C was built, and which of its CPU kernel variants runs here."""
    info = dict(ext.build_info())
    info["cpu_isa"] = ext.cpu_isa()
    info["cpu_isas_supported"] = ext.cpu_isas_supported()
    return info


def cuda_device(t: torch.Tensor) -> AbstractContextManager:
    """The context a kernel call on ``t`` runs in: t's GPU as the current device (the caller's
    restored on exit), so a tensor on cuda:1 is read on cuda:1 whatever device is current.
    Nothing for a tensor that is not on a GPU (CPU kernels, the Triton interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def cuda_stream_ptr(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the caller's current stream on t's device."""
    return torch.cuda.current_stream(t.device).cuda_stream
