"""Shared pytest setup.

Triton decides when it is first imported whether ``@triton.jit`` functions (its standard
library included) compile or run under the interpreter, from TRITON_INTERPRET. On a machine
without a CUDA GPU Triton can only run interpreted, so the interpreter is switched on here,
before any test imports triton; the Triton tests then run on CPU tensors (marked
``triton_interpret``). With a GPU it stays off, so the Triton tests exercise compiled kernels.
An explicit TRITON_INTERPRET in the environment is left as it is.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
