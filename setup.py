"""Build sparsekern._C with CMake + pybind11.

Environment knobs (all optional):
  SPARSEKERN_CUDA=auto|0|1     build the CUDA kernels when nvcc is found (auto), never, or require them
  SPARSEKERN_CUDA_ARCHS="80;90" CUDA architectures to compile for
  SPARSEKERN_NATIVE=1|0        compile the CPU kernels with -march=native (default 1)
  SPARSEKERN_BUILD_JOBS=N      parallel compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("SPARSEKERN_CUDA", "auto")
        if cuda not in ("auto", "0", "1"):
            raise RuntimeError(f"SPARSEKERN_CUDA must be auto, 0 or 1, not {cuda!r}")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPARSEKERN_CUDA={cuda}",
            f"-DSPARSEKERN_NATIVE={'ON' if os.environ.get('SPARSEKERN_NATIVE', '1') == '1' else 'OFF'}",
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
    name="sparsekern",
    version="0.1.0",
    description="Measure and harvest filter-level sparsity in CNNs (PyTorch + Triton + C++/CUDA)",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    ext_modules=[CMakeExtension("sparsekern._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.11", "torchvision", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "tensorboard"],
        "tensorboard": ["tensorboard"],  # training curves under <run>/tb; optional
        "bench": ["pytest-benchmark", "torch-pruning"],
    },
    entry_points={"console_scripts": ["sparsekern=sparsekern.cli:main"]},
    zip_safe=False,
)
