"""Benchmark timing: dense versus pruned speed (``sparsekern bench``) and the method shared by the
benchmarks/ scripts.

    from sparsekern.bench import interleaved_timer, timing_environment, speed_comparison
    timing = interleaved_timer({"a": f, "b": g}, device=device)       # {"a": {"median_s", "p20_s", ...}}
    speed = speed_comparison(dense, pruned, (1, 28, 28))              # what `sparsekern bench` prints

- ``timing.py``: the interleaved timer (candidates in rounds A, B, A, B... so load drift hits all
  alike), subnormal flushing, timing whole models, copy bandwidth;
- ``environment.py``: device name, versions, threads and date recorded with every result;
- ``speed.py``: inference copies (BN folded or fused, subnormals zeroed), the dense-versus-pruned
  comparison and its criterion, repeated runs;
- ``layers.py``: per-layer time next to MACs, to see where time does not follow FLOPs;
- ``results.py``: JSON files and plain tables of the benchmark scripts.

Markdown of these results is in ``sparsekern.report.speed``.
"""
from sparsekern.bench.environment import device_name, timing_environment
from sparsekern.bench.layers import layer_profile, leaf_times
from sparsekern.bench.results import activation_mib, add_activation_flags, milliseconds, print_table, write_json, write_results
from sparsekern.bench.speed import (
    SPEED_CRITERION,
    fuse_units,
    inference_model,
    repeat_summary,
    speed_comparison,
    subnormal_parameters,
)
from sparsekern.bench.timing import copy_bandwidth, flush_denormals, interleaved_timer, synchronize, time_models

__all__ = [
    "SPEED_CRITERION",
    "activation_mib",
    "add_activation_flags",
    "copy_bandwidth",
    "device_name",
    "flush_denormals",
    "fuse_units",
    "inference_model",
    "interleaved_timer",
    "layer_profile",
    "leaf_times",
    "milliseconds",
    "print_table",
    "repeat_summary",
    "speed_comparison",
    "subnormal_parameters",
    "synchronize",
    "time_models",
    "timing_environment",
    "write_json",
    "write_results",
]
