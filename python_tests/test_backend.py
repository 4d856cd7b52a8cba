"""Backend discovery and dispatch: what `import sparsekern` does with and without sparsekern._C,
where a kernel call selects its GPU, and where the Triton-interpreter cases run."""
import ast
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import triton_interpreter_broken

import sparsekern
from sparsekern import _backend

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run(code: str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_without_extension_falls_back_with_one_warning():
    # sys.modules[name] = None makes `from sparsekern import _C` raise ImportError, as a failed build would.
    proc = _run("""
        import sys, warnings, json
        sys.modules["sparsekern._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, sparsekern
            x = torch.randn(3, 5, 4, 4)
            a = sparsekern.channel_absmax(x)
            b = sparsekern.channel_absmax(x)
            info = sparsekern.backends()
        ours = [str(w.message) for w in caught if "sparsekern._C" in str(w.message)]
        try:
            sparsekern.channel_absmax(x, backend="cpp")
            explicit = "no error"
        except sparsekern.BackendUnavailableError as e:
            explicit = str(e)
        print(json.dumps({"warnings": ours, "ok": bool(torch.equal(a, x.abs().amax((2, 3)))),
                          "available": info["available"]["cpu"], "extension": info["extension"],
                          "explicit": explicit}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "Falling back to the pure-torch reference" in out["warnings"][0]
    assert out["ok"]
    assert "cpp" not in out["available"] and "torch" in out["available"] and out["extension"] is None
    assert "backend 'cpp' is unavailable" in out["explicit"] and "could not be loaded" in out["explicit"]


def test_import_touches_no_cuda_driver():
    # Nothing at import time may initialise CUDA (DESIGN.md): a GPU-less machine must import cleanly.
    # The Triton kernels too, decorated compiled or interpreted (whichever this environment says).
    triton_modules = ", sparsekern.triton.channel_absmax, sparsekern.triton.bn_relu" if HAS_TRITON else ""
    proc = _run(f"""
        import torch, sparsekern, sparsekern.stats.channel_stats, sparsekern.ops.bn_relu{triton_modules}
        print(torch.cuda.is_initialized())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_backends_reports_build_and_availability():
    info = sparsekern.backends()
    assert info["torch"] == torch.__version__
    assert "torch" in info["available"]["cpu"]
    if _backend.extension() is not None:
        assert "cpp" in info["available"]["cpu"]
        build = info["extension"]
        assert {"compiler", "pybind11", "openmp", "cpu_isas", "cpu_isa", "cpu_isas_supported", "cuda"} <= set(build)
        assert build["cpu_isa"] in build["cpu_isas_supported"]
        assert set(build["cpu_isas_supported"]) <= set(build["cpu_isas"])


def test_env_default_backend_is_used_for_auto(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "torch")
    assert _backend.resolve("auto", torch.device("cpu"), op="t") == "torch"
    monkeypatch.setenv("SPARSEKERN_BACKEND", "cuda")
    with pytest.raises(sparsekern.BackendUnavailableError, match="cuda"):
        _backend.resolve("auto", torch.device("cpu"), op="t")


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    expected = "cpp" if _backend.extension() is not None else "torch"
    assert _backend.resolve("auto", torch.device("cpu"), op="t") == expected


# ---------------------------------------------------------------------------------------------
# CPU kernel variants (csrc/include/sparsekern/cpu_isa.h): compiled for several instruction sets,
# the best one the CPU supports picked at load, SPARSEKERN_CPU_ISA to force another.

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("avx512", "avx2", "baseline")
needs_extension = pytest.mark.skipif(_backend.extension() is None, reason="sparsekern._C is not built")


def _build() -> dict:
    return _backend._extension_info(_backend.extension())


def _without_isa_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SPARSEKERN_CPU_ISA"}


def _run_clean(code: str, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**_without_isa_env(), **env_extra}, timeout=120, cwd=ROOT)


def _variant_or_skip(isa: str) -> None:
    build = _build()
    if isa not in build["cpu_isas"]:
        pytest.skip(f"this build has no {isa} variant (it has {build['cpu_isas']})")
    if isa not in build["cpu_isas_supported"]:
        pytest.skip(f"this CPU cannot run the {isa} variant")


@needs_extension
def test_default_build_is_portable_with_runtime_dispatch():
    build = _build()
    if build["cpu_isas"] == ["native"]:
        pytest.skip("built with SPARSEKERN_NATIVE=1")
    expected = list(VARIANTS) if platform.machine().lower() in ("x86_64", "amd64") else ["baseline"]
    assert build["cpu_isas"] == expected


@needs_extension
def test_best_supported_variant_runs_by_default():
    proc = _run_clean("""
        import json, sparsekern
        print(json.dumps(sparsekern.backends()["extension"]))
    """)
    assert proc.returncode == 0, proc.stderr
    build = json.loads(proc.stdout.strip().splitlines()[-1])
    assert build["cpu_isa"] == build["cpu_isas_supported"][0]
    assert "baseline" in build["cpu_isas_supported"] or build["cpu_isas"] == ["native"]


@needs_extension
@pytest.mark.parametrize("isa", VARIANTS)
def test_cpu_isa_env_selects_the_variant(isa):
    _variant_or_skip(isa)
    proc = _run_clean("""
        import json, torch, sparsekern
        x = torch.randn(3, 20, 7, 9).to(memory_format=torch.channels_last)
        x[1, 5, 2, 3] = float("nan")
        out = sparsekern.channel_absmax(x, backend="cpp")
        ref = x.double().abs().amax((2, 3)).float()
        print(json.dumps({"isa": sparsekern.backends()["extension"]["cpu_isa"],
                          "ok": bool(torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num()))}))
    """, SPARSEKERN_CPU_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"isa": isa, "ok": True}


@needs_extension
@pytest.mark.parametrize("isa, message", [
    ("sse9", "unknown instruction set 'sse9'; expected auto or one of this build's: "),
    ("native", "this build has no native kernels; expected auto or one of this build's: "),
])
def test_cpu_isa_env_naming_no_variant_is_a_clear_error(isa, message):
    if _build()["cpu_isas"] == ["native"] and isa == "native":
        pytest.skip("built with SPARSEKERN_NATIVE=1")
    proc = _run_clean("""
        import torch, sparsekern
        from sparsekern._backend import CpuIsaError
        try:
            sparsekern.channel_absmax(torch.ones(2, 3, 4, 4))
        except CpuIsaError as exc:
            print("CpuIsaError:", exc)
    """, SPARSEKERN_CPU_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"CpuIsaError: SPARSEKERN_CPU_ISA={isa!r}: {message}")
    assert ", ".join(_build()["cpu_isas"]) in line


@needs_extension
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_cpu_isa_the_cpu_lacks_is_a_clear_error(isa):
    build = _build()
    if isa not in build["cpu_isas"] or isa in build["cpu_isas_supported"]:
        pytest.skip(f"needs a build with {isa} on a CPU without it")
    with pytest.raises(ValueError, match=f"this CPU does not support the {isa} kernels \\(it runs: "):
        _backend.extension().set_cpu_isa(isa)


@needs_extension
def test_set_cpu_isa_switches_and_auto_restores_the_best():
    ext = _backend.extension()
    before = ext.cpu_isa()
    try:
        ext.set_cpu_isa(ext.cpu_isas_supported()[-1])
        assert ext.cpu_isa() == ext.cpu_isas_supported()[-1]
        ext.set_cpu_isa("auto")
        assert ext.cpu_isa() == ext.cpu_isas_supported()[0]
    finally:
        ext.set_cpu_isa(before)


@pytest.mark.slow
@needs_extension
@pytest.mark.parametrize("isa", VARIANTS)
def test_cpu_kernel_tests_pass_on_every_variant(isa):
    """The cpp cases of the channel_absmax and bn_relu suites (every option, dtype and layout),
    rerun under SPARSEKERN_CPU_ISA for each variant other than the one this run already used."""
    _variant_or_skip(isa)
    if isa == _backend.extension().cpu_isa():
        pytest.skip(f"{isa} is the variant this test run itself uses")
    files = [str(ROOT / "python_tests" / name) for name in ("test_channel_absmax.py", "test_bn_relu.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-k", "cpp"],
                          capture_output=True, text=True, env={**os.environ, "SPARSEKERN_CPU_ISA": isa},
                          timeout=900, cwd=ROOT)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100, summary


# ---------------------------------------------------------------------------------------------
# Device selection: one place, sparsekern._backend.cuda_device, around every kernel call.

ROOT_PACKAGE = ROOT / "sparsekern"


def _selects_a_device(path: Path) -> list[str]:
    """Lines of ``path`` that make a GPU current themselves."""
    needles = ("torch.cuda.device(", "torch.cuda.set_device(", "cudaSetDevice(")
    return [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if any(n in line for n in needles)]


def test_cuda_device_is_selected_in_one_place():
    """No kernel module, Python or C++, selects a device: only _backend.cuda_device does."""
    kernel_files = [*(ROOT_PACKAGE / "ops").glob("*.py"), *(ROOT_PACKAGE / "triton").glob("*.py"),
                    *(ROOT / "csrc").rglob("*.c*"), *(ROOT / "csrc").rglob("*.h")]
    offenders = [hit for path in kernel_files for hit in _selects_a_device(path)]
    assert not offenders, "device selection outside sparsekern._backend.cuda_device:\n" + "\n".join(offenders)
    assert _selects_a_device(ROOT_PACKAGE / "_backend.py"), "cuda_device should be where the device is selected"


def _is_cuda_device_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda_device"


@pytest.mark.parametrize("op", ["channel_absmax", "bn_relu"])
def test_every_kernel_call_of_an_op_runs_in_cuda_device(op):
    """Each op's calls of a CUDA / C++ kernel (``*_cuda``, ``*_cpu``) or Triton launcher
    (``*_triton``) sit inside ``with _backend.cuda_device(x):``."""
    tree = ast.parse((ROOT_PACKAGE / "ops" / f"{op}.py").read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(_is_cuda_device_call(item.context_expr) for item in node.items):
            guarded.update(id(inner) for inner in ast.walk(node))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and (getattr(node.func, "attr", None) or getattr(node.func, "id", "")).endswith(("_cuda", "_cpu", "_triton"))]
    assert len(calls) == 3, [ast.unparse(c.func) for c in calls]  # cpp, cuda and triton
    assert all(id(call) in guarded for call in calls), [ast.unparse(c.func) for c in calls if id(c) not in guarded]


def test_cuda_device_does_nothing_for_cpu_tensors():
    proc = _run("""
        import torch
        from sparsekern._backend import cuda_device
        with cuda_device(torch.ones(2, 3)):
            pass
        print(torch.cuda.is_initialized())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_tensor_on_another_gpu_runs_there(backend):
    """x on cuda:1 while cuda:0 is current: right results from both ops, and cuda:0 still current."""
    if backend == "cuda" and not getattr(_backend.extension(), "with_cuda", False):
        pytest.skip("sparsekern._C was built without CUDA kernels")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    torch.cuda.set_device(0)
    x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(0)).to("cuda:1")
    scale, shift = torch.rand(5, device="cuda:1") + 0.5, torch.randn(5, device="cuda:1")
    m = sparsekern.channel_absmax(x, backend=backend)
    y, ym = sparsekern.bn_relu(x, scale, shift, return_max=True, backend=backend)
    torch.cuda.synchronize("cuda:1")
    assert torch.cuda.current_device() == 0
    assert m.device == y.device == torch.device("cuda:1")
    assert torch.equal(m.cpu(), x.cpu().abs().amax((2, 3)))
    expected = torch.relu(x.cpu() * scale.cpu().reshape(1, 5, 1, 1) + shift.cpu().reshape(1, 5, 1, 1))
    assert torch.allclose(y.cpu(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ym.cpu(), y.cpu().amax((2, 3)))


# ---------------------------------------------------------------------------------------------
# The Triton-interpreter cases on a machine with a GPU (see conftest.py)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_cases_run_without_the_gpu():
    """Where this process compiles Triton (a GPU machine), the triton-interpret cases of the op
    suites skip here; run them as a GPU-less machine would: in a fresh process with
    TRITON_INTERPRET=1 set before triton is imported and no GPU visible."""
    from sparsekern.triton._utils import triton_interprets

    if triton_interprets():
        pytest.skip("this process interprets Triton: the triton-interpret cases ran in it")
    broken = triton_interpreter_broken()
    if broken:
        pytest.skip(broken)
    files = [str(ROOT / "python_tests" / name) for name in ("test_channel_absmax.py", "test_bn_relu.py")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-m",
                           "triton_interpret"], capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 200 and "skipped" not in summary, summary
