# The two entry points of the README. Each does all set-up itself (scripts/setup.sh).
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test bench build

setup:
	bash scripts/setup.sh

# Main job: train BasicNet on Fashion-MNIST under several configurations, measure sparsity, report.
demo: setup
	$(PY) -m sparsekern demo

# Whole test suite (Triton kernels run under TRITON_INTERPRET=1 in the tests that need it).
test: setup
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run_all.py

build:
	bash scripts/build_ext.sh
