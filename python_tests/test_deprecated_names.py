"""Old import paths of names that moved (issue 12) keep working for a release: each returns the
object at its new place and warns, naming that place; importing an old module loads nothing of the
layers above it."""
import importlib
import subprocess
import sys

import pytest

import sparsekern.prune.harvest as old_harvest

# old module -> {old name: dotted path of the new home}
MOVED = {
    "sparsekern.prune.harvest": {
        **{name: f"sparsekern.experiments.harvest.{name}" for name in (
            "FILES", "first_batch", "prune_trained", "prune_run", "load_pruned", "dense_and_pruned",
            "compare_methods", "slimming_config", "harvest_run")},
        **{name: f"sparsekern.bench.speed.{name}" for name in (
            "SPEED_CRITERION", "fuse_units", "inference_model", "subnormal_parameters", "speed_comparison",
            "repeat_summary")},
        **{name: f"sparsekern.bench.timing.{name}" for name in ("flush_denormals", "interleaved_timer", "time_models")},
        **{name: f"sparsekern.bench.environment.{name}" for name in ("timing_environment", "device_name")},
        **{name: f"sparsekern.report.speed.{name}" for name in ("speed_markdown", "repeat_markdown")},
        "comparison_markdown": "sparsekern.report.pruning.comparison_markdown",
        "compare_logits": "sparsekern.prune.compare.compare_logits",
        "unit_keep_ratio": "sparsekern.prune.compare.unit_keep_ratio",
    },
    "sparsekern.prune": {
        "layer_profile": "sparsekern.bench.layers.layer_profile",
        "profile_markdown": "sparsekern.report.speed.profile_markdown",
    },
    "sparsekern.prune.baselines": {
        "SlimmingPenalty": "sparsekern.regularize.slimming.SlimmingPenalty",
        "SlimmingRegularizer": "sparsekern.regularize.slimming.SlimmingRegularizer",
        "fine_tune": "sparsekern.train.finetune.fine_tune",
    },
    "sparsekern.regularize.penalties": {"Regularizer": "sparsekern.regularize.penalties.ProximalRegularizer"},
}
CASES = [(old, name, new) for old, names in MOVED.items() for name, new in names.items()]


@pytest.mark.parametrize("old, name, new", CASES, ids=[f"{o}.{n}" for o, n, _ in CASES])
def test_old_name_warns_and_is_the_new_object(old, name, new):
    home, _, attr = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is deprecated.*use {new}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(home), attr)


def test_from_import_of_an_old_name_warns_at_the_importing_line():
    with pytest.warns(DeprecationWarning) as record:
        from sparsekern.prune.harvest import prune_run  # noqa: F401
    assert record[0].filename == __file__


def test_unknown_names_are_still_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        old_harvest.nope


def test_importing_the_old_modules_loads_nothing_above_pruning():
    code = ("import sys, sparsekern.prune, sparsekern.prune.harvest, sparsekern.prune.baselines; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['sparsekern', 'bench'], ['sparsekern', 'experiments'], ['sparsekern', 'train'], ['sparsekern', 'report'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
