"""Packaging: license and metadata, the optional build of sparsekern._C (SPARSEKERN_BUILD_EXT),
what the sdist holds, and the optional matplotlib. scripts/ci_package.sh (run by .ci/run)
installs the wheel and the sdist in fresh venvs, with and without a compiler."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# What setup.py needs to run: its metadata lives in pyproject.toml, the version in sparsekern/__init__.py.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "LICENSE", "csrc")


def test_license_file_is_bsd3_with_the_copyright_line():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, the sparsekern authors" in text
    assert "Neither the name of the copyright holder nor the names of its" in text  # clause 3


def test_license_metadata():
    assert PROJECT["license"] == "BSD-3-Clause"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]  # the expression says it


def test_python_requirement_matches_what_ci_tests():
    assert PROJECT["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)
    versions = sorted(c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", c))
    assert versions == ["3.11", "3.12"]


def test_optional_pieces_are_extras():
    assert not [d for d in PROJECT["dependencies"] if d.startswith(("matplotlib", "tensorboard"))]
    extras = PROJECT["optional-dependencies"]
    assert extras["figures"] == ["matplotlib"]
    assert extras["tensorboard"] == ["tensorboard"]


def test_report_works_without_matplotlib_until_a_figure_is_drawn():
    # sys.modules[name] = None makes `import matplotlib` raise ImportError, as if it were not installed.
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None
        import sparsekern.report
        from sparsekern.report.tables import Table
        from sparsekern.report.figures import figure_gamma_decay
        try:
            figure_gamma_decay({"a": [{"step": 1, "total": {"mean_abs_gamma": 0.5, "dead_by_gamma_pct": 0.0}}]},
                               "unused.png")
        except ImportError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("drawing figures needs matplotlib, which is not installed: "
                                   "pip install 'sparsekern[figures]'")


# ---------------------------------------------------------------------------------------------
# setup.py, run in a copy of the build inputs (so nothing touches this tree's build)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name)
        else:
            shutil.copy2(path, src / name)
    shutil.copytree(ROOT / "sparsekern", src / "sparsekern",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    return src


def _setup_py(src: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEKERN_")}
    environment.update(env)
    return subprocess.run([sys.executable, "setup.py", *args], capture_output=True, text=True, timeout=300,
                          cwd=src, env=environment)


def test_no_compiler_with_auto_installs_without_the_extension_and_one_warning(source_copy):
    proc = _setup_py(source_copy, "build_ext", "--inplace", SPARSEKERN_BUILD_EXT="auto", CC="/bin/false",
                     CXX="/bin/false")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "sparsekern._C is not built" in line]
    assert len(warnings) == 1, proc.stdout + proc.stderr
    assert warnings[0].startswith("WARNING: sparsekern._C is not built: no working C++ compiler "
                                  "(/bin/false cannot compile a test program). sparsekern installs without it")
    assert not list((source_copy / "sparsekern").glob("_C*.so"))


def test_no_compiler_with_build_ext_1_is_an_error(source_copy):
    proc = _setup_py(source_copy, "build_ext", "--inplace", SPARSEKERN_BUILD_EXT="1", CXX="/bin/false")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: SPARSEKERN_BUILD_EXT=1 but sparsekern._C cannot be built: no working C++ compiler "
        "(/bin/false cannot compile a test program)")


def test_build_ext_0_builds_nothing_and_says_nothing(source_copy):
    proc = _setup_py(source_copy, "build_ext", "--inplace", SPARSEKERN_BUILD_EXT="0", CXX="/bin/false")
    assert proc.returncode == 0, proc.stderr
    assert "sparsekern._C" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("knob, value", [("SPARSEKERN_BUILD_EXT", "yes"), ("SPARSEKERN_NATIVE", "on")])
def test_bad_knob_value_is_a_one_line_error(source_copy, knob, value):
    proc = _setup_py(source_copy, "build_ext", "--inplace", **{knob: value})
    assert proc.returncode != 0
    allowed = "auto, 0, 1" if knob == "SPARSEKERN_BUILD_EXT" else "0, 1"
    assert proc.stderr.strip() == f"error: {knob} must be one of {allowed}, not {value!r}"


def test_sdist_holds_everything_the_build_needs(source_copy, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=source_copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = tmp_path.glob("sparsekern-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md", "sparsekern/__init__.py",
            "sparsekern/_backend.py"} <= names
    assert not [n for n in names if n.endswith(".so")]
    assert "License-Expression: BSD-3-Clause" in pkg_info
    assert "Requires-Python: >=3.11" in pkg_info
    assert "Provides-Extra: figures" in pkg_info
