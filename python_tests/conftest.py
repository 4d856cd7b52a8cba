"""Shared pytest setup: whether this test process runs Triton compiled or interpreted.

Triton fixes the mode when it is imported: every ``@triton.jit`` function, its own library
(``tl.max``, ``tl.cdiv``) and sparsekern's kernels alike, compiles or interprets according to
TRITON_INTERPRET at decoration time. A process therefore runs Triton one way only, and the
variable must be set before anything imports triton; switching it later (in a fixture) leaves
triton's library compiled under interpreted kernels, which cannot run.

So, once per session and before any test imports triton:
- without a CUDA GPU, TRITON_INTERPRET=1: the Triton cases run interpreted on CPU tensors
  (the ``triton-interpret`` kind, marked ``triton_interpret``); there is no compiled Triton.
- with a GPU it stays off: the ``triton-cuda`` cases run the kernels compiled on the GPU,
  and the ``triton-interpret`` cases skip in this process, saying so. They are not lost:
  test_backend.py::test_triton_interpreter_cases_run_without_the_gpu reruns them in a
  subprocess with TRITON_INTERPRET=1 and no visible GPU, i.e. as on a machine without one.
An explicit TRITON_INTERPRET in the environment is left as it is (TRITON_INTERPRET=1 on a GPU
machine runs the interpreter in this process, for CUDA tensors too, slowly).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
