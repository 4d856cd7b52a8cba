#!/usr/bin/env bash
# Rebuild sparsekern._C in place (serialised with a lock, so parallel callers don't collide).
# The knobs of setup.py apply (SPARSEKERN_CUDA, SPARSEKERN_NATIVE, ...); a build that cannot
# run or fails is an error here (SPARSEKERN_BUILD_EXT=1 unless set otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARSEKERN_BUILD_EXT="${SPARSEKERN_BUILD_EXT:-1}"
exec flock /tmp/sparsekern-build.lock python setup.py -q build_ext --inplace
