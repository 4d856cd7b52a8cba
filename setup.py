"""Build sparsekern._C, the optional compiled kernels, with CMake + pybind11.

The package metadata is in pyproject.toml; this file only builds the extension.

Environment knobs (all optional):
  SPARSEKERN_BUILD_EXT=auto|0|1 build sparsekern._C: try, and if that is impossible or fails
                               install without it (auto, the default: one warning naming what
                               was missing); never (0); or fail the install if it cannot be built (1)
  SPARSEKERN_CUDA=auto|0|1     build the CUDA kernels when nvcc is found (auto), never, or require them
  SPARSEKERN_CUDA_ARCHS="80;90" CUDA architectures to compile for
  SPARSEKERN_NATIVE=0|1        1: compile for this machine only (-march=native, one CPU variant);
                               0 (default): portable, with baseline / AVX2 / AVX-512 CPU kernels
                               picked at load time from the CPU
  SPARSEKERN_BUILD_JOBS=N      parallel compile jobs
Without sparsekern._C every op runs on its pure-torch (and Triton) backend.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _knob(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default)
    if value not in allowed:
        raise SystemExit(f"error: {name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


BUILD_EXT = _knob("SPARSEKERN_BUILD_EXT", "auto", ("auto", "0", "1"))


def _cxx_compiler() -> list[str] | None:
    """The C++ compiler CMake will use: $CXX, else the first of c++, g++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = next((shutil.which(name) for name in ("c++", "g++", "clang++") if shutil.which(name)), None)
    return [found] if found else None


def missing_build_tool() -> str | None:
    """What stops sparsekern._C from being built here, or None if everything it needs is present."""
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (pip install pybind11)"
    if shutil.which("cmake") is None:
        return "cmake is not on PATH (pip install cmake)"
    cxx = _cxx_compiler()
    if cxx is None:
        return "no C++ compiler (CXX is not set and none of c++, g++, clang++ is on PATH)"
    try:
        probe = subprocess.run([*cxx, "-x", "c++", "-std=c++17", "-c", "-o", os.devnull, "-"],
                               input="int main() { return 0; }\n", capture_output=True, text=True, timeout=120)
        works = probe.returncode == 0
    except OSError:
        works = False
    if not works:
        return f"no working C++ compiler ({shlex.join(cxx)} cannot compile a test program)"
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        if not self.extensions:  # SPARSEKERN_BUILD_EXT=0
            return
        problem = missing_build_tool()
        if BUILD_EXT == "1":
            if problem:
                raise SystemExit(f"error: SPARSEKERN_BUILD_EXT=1 but sparsekern._C cannot be built: {problem}")
            super().run()
            return
        if problem is None:
            try:
                super().run()
                return
            except (subprocess.CalledProcessError, OSError) as exc:
                problem = f"its build failed ({exc}; the CMake and compiler output is above)"
        self.extensions = []  # so that no later step looks for the file that was not built
        print(f"WARNING: sparsekern._C is not built: {problem}. sparsekern installs without it and runs "
              "on its torch and Triton backends (no C++ CPU or CUDA kernels); fix that and reinstall, or set "
              "SPARSEKERN_BUILD_EXT=0 to install without it and without this warning.", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _knob("SPARSEKERN_CUDA", "auto", ("auto", "0", "1"))
        native = _knob("SPARSEKERN_NATIVE", "0", ("0", "1"))
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPARSEKERN_CUDA={cuda}",
            f"-DSPARSEKERN_NATIVE={'ON' if native == '1' else 'OFF'}",
        ]
        if "SPARSEKERN_CUDA_ARCHS" in os.environ:
            cmake_args.append(f"-DSPARSEKERN_CUDA_ARCHS={os.environ['SPARSEKERN_CUDA_ARCHS']}")
        try:
            import ninja  # noqa: F401

            cmake_args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("SPARSEKERN_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[] if BUILD_EXT == "0" else [CMakeExtension("sparsekern._C")],
    cmdclass={"build_ext": CMakeBuild},
)
