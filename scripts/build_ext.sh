#!/usr/bin/env bash
# Rebuild sparsekern._C in place (serialised with a lock, so parallel callers don't collide).
# SPARSEKERN_CUDA=auto|0|1 as in setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/sparsekern-build.lock python setup.py -q build_ext --inplace
