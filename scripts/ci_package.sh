#!/usr/bin/env bash
# Packaging check (CI, after `make test`): what a user gets from `pip install`.
#  1. `python -m build` makes the sdist, then the wheel from the unpacked sdist (so the sdist
#     must hold everything the build needs), each in an isolated build environment.
#  2. The wheel, installed in a fresh venv: imports, has sparsekern._C and its C++ CPU kernels.
#  3. The sdist, installed in a fresh venv with no working C++ compiler (CC=CXX=/bin/false) and
#     SPARSEKERN_BUILD_EXT=auto: the install succeeds with exactly one warning and sparsekern
#     runs on its torch backend.
# The venvs see the system's packages so that torch is not downloaded again (make_venv), and
# every check runs from a scratch directory and asserts that `sparsekern` is the venv's own copy.
# The CUDA kernels are left out of this build (SPARSEKERN_CUDA=0): `make test` builds them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export SPARSEKERN_CUDA=0 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -c "import build" 2>/dev/null || "$PY" -m pip install -q build

step() { echo "== ci_package [${SECONDS}s]: $*"; }

# make_venv DIR: a fresh venv that can import the system's packages (torch, numpy, ...) through a
# .pth line naming the system's site-packages, and so without running that directory's own .pth
# hooks: an editable install of sparsekern there (`make test` makes one) installs an import hook
# that would otherwise serve sparsekern._C from the source tree to the venv's sparsekern.
make_venv() {
  "$PY" -m venv "$1"
  local system venv_site
  system="$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))')"
  venv_site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$system" > "$venv_site/system-site-packages.pth"
}

# A clean copy of the source (what git tracks, plus new files it does not ignore): no build
# products of the working tree can leak into the sdist.
step "python -m build (sdist, then the wheel from it)"
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | xargs -0 cp --parents -t "$WORK/src"
(cd "$WORK/src" && "$PY" -m build --outdir "$WORK/dist" > "$WORK/build.log" 2>&1) \
  || { tail -n 60 "$WORK/build.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/sparsekern-*.tar.gz)"
WHEEL="$(ls "$WORK"/dist/sparsekern-*.whl)"
echo "built $(basename "$SDIST") and $(basename "$WHEEL")"

# smoke VENV BACKEND: import from a scratch dir, the CPU backend in use, one op against its
# reference, and the `sparsekern info` console script.
smoke() {
  local venv="$1" backend="$2"
  mkdir -p "$WORK/run" && cd "$WORK/run"
  "$venv/bin/python" - "$backend" <<'PYEOF'
import os, sys, warnings
import torch

warnings.simplefilter("ignore", RuntimeWarning)  # the torch-only install warns that _C is missing
import sparsekern

here = os.path.realpath(sparsekern.__file__)
assert here.startswith(os.path.realpath(sys.prefix) + os.sep), f"imported {here}, not the venv's copy"
ext = sparsekern._backend.extension()
assert ext is None or os.path.realpath(ext.__file__).startswith(os.path.dirname(here)), f"_C from {ext.__file__}"
expected = sys.argv[1]
info = sparsekern.backends()
cpu = info["available"]["cpu"]
if expected == "cpp":
    assert "cpp" in cpu and info["extension"] is not None, info
    where = f"cpu kernels {info['extension']['cpu_isa']} of {info['extension']['cpu_isas']}"
else:
    assert "cpp" not in cpu and info["extension"] is None, info
    where = "no sparsekern._C"
x = torch.randn(4, 6, 9, 9)
x[1, 2, 3, 4] = -50.0
out = sparsekern.channel_absmax(x, backend=expected)
assert torch.equal(out, x.abs().amax(dim=(2, 3))), "channel_absmax differs from its reference"
print(f"smoke ok: sparsekern {sparsekern.__version__} from {os.path.dirname(here)}, backend {expected}, {where}")
PYEOF
  "$venv/bin/sparsekern" info > "$WORK/info.json"
  "$venv/bin/python" -c "import json, sys; json.load(open(sys.argv[1]))" "$WORK/info.json"
  echo "sparsekern info ok"
  cd - > /dev/null
}

step "install the wheel in a fresh venv"
make_venv "$WORK/venv-wheel"
"$WORK/venv-wheel/bin/python" -m pip install -q --no-cache-dir "$WHEEL"
smoke "$WORK/venv-wheel" cpp

step "install the sdist in a fresh venv with no working C++ compiler (SPARSEKERN_BUILD_EXT=auto)"
make_venv "$WORK/venv-nocc"
CC=/bin/false CXX=/bin/false SPARSEKERN_BUILD_EXT=auto \
  "$WORK/venv-nocc/bin/python" -m pip install -v --no-cache-dir "$SDIST" > "$WORK/nocc.log" 2>&1 \
  || { tail -n 60 "$WORK/nocc.log"; exit 1; }
warnings_seen="$(grep -c "WARNING: sparsekern._C is not built" "$WORK/nocc.log" || true)"
grep -m1 "WARNING: sparsekern._C is not built" "$WORK/nocc.log" || true
if [ "$warnings_seen" != 1 ]; then
  echo "ci_package: expected exactly one 'sparsekern._C is not built' warning, saw $warnings_seen" >&2
  exit 1
fi
smoke "$WORK/venv-nocc" torch

step "ok"
