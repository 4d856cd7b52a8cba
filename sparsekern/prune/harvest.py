"""Deprecated: what this module held now lives where its job is (one release of old names).

- the implicit plan: ``sparsekern.prune.implicit`` (``implicit_plan``);
- logits of a pruned model against its original, filters kept: ``sparsekern.prune.compare``;
- run directories -> pruned models, the comparison with the baselines: ``sparsekern.experiments.harvest``;
- timing (``sparsekern bench``): ``sparsekern.bench``;
- markdown of the results: ``sparsekern.report.pruning`` and ``sparsekern.report.speed``.

Every old name still works from here, with a DeprecationWarning naming its new place; the
names that moved up the layers are imported only when used.
"""
from __future__ import annotations

from sparsekern._deprecated import deprecated_paths

_MOVED = {
    "implicit_plan": "sparsekern.prune.implicit.implicit_plan",
    "PLAN_KINDS": "sparsekern.prune.implicit.PLAN_KINDS",
    "compare_logits": "sparsekern.prune.compare.compare_logits",
    "unit_keep_ratio": "sparsekern.prune.compare.unit_keep_ratio",
    "FILES": "sparsekern.experiments.harvest.FILES",
    "first_batch": "sparsekern.experiments.harvest.first_batch",
    "prune_trained": "sparsekern.experiments.harvest.prune_trained",
    "prune_run": "sparsekern.experiments.harvest.prune_run",
    "load_pruned": "sparsekern.experiments.harvest.load_pruned",
    "dense_and_pruned": "sparsekern.experiments.harvest.dense_and_pruned",
    "compare_methods": "sparsekern.experiments.harvest.compare_methods",
    "slimming_config": "sparsekern.experiments.harvest.slimming_config",
    "harvest_run": "sparsekern.experiments.harvest.harvest_run",
    "SPEED_CRITERION": "sparsekern.bench.speed.SPEED_CRITERION",
    "fuse_units": "sparsekern.bench.speed.fuse_units",
    "inference_model": "sparsekern.bench.speed.inference_model",
    "subnormal_parameters": "sparsekern.bench.speed.subnormal_parameters",
    "speed_comparison": "sparsekern.bench.speed.speed_comparison",
    "repeat_summary": "sparsekern.bench.speed.repeat_summary",
    "flush_denormals": "sparsekern.bench.timing.flush_denormals",
    "interleaved_timer": "sparsekern.bench.timing.interleaved_timer",
    "time_models": "sparsekern.bench.timing.time_models",
    "timing_environment": "sparsekern.bench.environment.timing_environment",
    "device_name": "sparsekern.bench.environment.device_name",
    "speed_markdown": "sparsekern.report.speed.speed_markdown",
    "repeat_markdown": "sparsekern.report.speed.repeat_markdown",
    "comparison_markdown": "sparsekern.report.pruning.comparison_markdown",
}

__getattr__ = deprecated_paths(__name__, _MOVED)
