#!/usr/bin/env bash
# One-time set-up from a fresh clone: Python dependencies, the Fashion-MNIST data package
# (where apt is available) and the compiled extension. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# torch: keep an installed torch >= 2.11 with torchvision (e.g. a GPU image), else pin 2.14.1.
if ! "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch, torchvision
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
then
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
# matplotlib and tensorboard are optional extras of the package (figures, tensorboard) that
# `make demo` and the tests use; build makes the sdist and wheel (scripts/ci_package.sh).
"$PY" -m pip install -q "pybind11>=2.12" "cmake>=3.18" ninja "setuptools>=77" build numpy tqdm matplotlib \
  pytest pytest-benchmark tensorboard

# The extras `timm` (timm models, .safetensors weights: `--model timm:NAME`, `--weights x.safetensors`),
# `export` (ONNX export and its onnxruntime check: `prune --onnx`) and `cluster` (submitit: `sweep --launcher
# submitit`), so the tests cover them. The torch and
# torchvision already installed are named in the same command (their public version, without a +cu tag),
# so that resolving timm's `torch` / `torchvision` requirements can never replace them.
TORCH_PINS=$("$PY" -c "import torch, torchvision; print(f'torch=={torch.__version__.split(\"+\")[0]} torchvision=={torchvision.__version__.split(\"+\")[0]}')")
# shellcheck disable=SC2086  # two words on purpose
"$PY" -m pip install -q "timm>=1.0" "safetensors>=0.4" "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.3" \
  "submitit>=1.5" $TORCH_PINS

# Real Fashion-MNIST from Debian (the default dataset); skipped quietly where apt is absent.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: could not install dataset-fashion-mnist with apt; pass --data-root to use another copy" >&2
fi

# sparsekern itself, editable, with sparsekern._C built by CMake (CUDA kernels when nvcc is found).
# A failed build is an error here, so that the tests never silently run without the C++ kernels
# (set SPARSEKERN_BUILD_EXT=auto or 0 to set up without them).
SPARSEKERN_BUILD_EXT="${SPARSEKERN_BUILD_EXT:-1}" "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import sparsekern, json; print('sparsekern backends:', json.dumps(sparsekern.backends()['available']))"
