"""State dicts of ChannelStats and SparsityTracker are checked before they are loaded, and a
two-pass analysis fails the same way on every rank when one rank's loader changes.

Each invariant gets one case: a valid state (written by ``state_dict`` after real updates) with
one field broken; loading it must raise StateDictError naming that field, on one line, and
leave the target as it was.

The distributed test runs this file as a script (``python test_stats_validation.py rank world
init_file out_file``) in two processes, as test_analyze_distributed.py does.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from _helpers import PerPassLoader, run_ranks
from sparsekern.stats.channel_stats import ChannelStats, StateDictError
from sparsekern.stats.tracker import SparsityTracker

N, C = 25, 9
NAN_CHANNEL, INF_CHANNEL = 2, 3
THRESHOLDS = (1e-3, 0.3)


def activations() -> torch.Tensor:
    """(N, C, 4, 4) post-ReLU-like activations: one channel with a NaN, one with an Inf."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(N, C, 4, 4, generator=g))
    x[:, 0] = 0  # dead
    x[: N // 3, 4] *= 1e-5  # a third far below the max: the two thresholds count differently
    x[5, NAN_CHANNEL, 1, 1] = float("nan")
    x[7, INF_CHANNEL, 0, 0] = float("inf")
    return x


def fed(mode: str, tmp_path, finite: bool = False) -> ChannelStats:
    """Stats of ``mode`` ("two_pass" = "none" with a reference) that saw activations() in 2 batches."""
    x = activations()
    if finite:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0)
    stats = ChannelStats(selectivity="none" if mode == "two_pass" else mode,
                         memmap_path=tmp_path / "rows.f32" if mode == "memmap" else None)
    if mode == "two_pass":
        m = x.reshape(N, C, -1).abs().amax(dim=2)
        reference = torch.where(torch.isfinite(m), m, 0.0).amax(dim=0)
        stats.set_reference_max(reference, thresholds=THRESHOLDS)
    stats.update(x[:10])
    stats.update(x[10:])
    return stats


def target(mode: str, tmp_path) -> ChannelStats:
    return ChannelStats(selectivity="none" if mode == "two_pass" else mode,
                        memmap_path=tmp_path / "target.f32" if mode == "memmap" else None)


def set_(key, value):
    def mutate(sd, tmp_path):
        sd[key] = value
    return mutate


def set_at(key, index, value):
    def mutate(sd, tmp_path):
        sd[key] = sd[key].clone()
        sd[key][index] = value
    return mutate


def scale_at(key, index, factor):
    def mutate(sd, tmp_path):
        sd[key] = sd[key].clone()
        sd[key][index] *= factor
    return mutate


def delete(key):
    def mutate(sd, tmp_path):
        del sd[key]
    return mutate


def no_samples(sd, tmp_path):
    """Claim no samples while keeping the rest (a clean state: no NaN / Inf counts to trip first)."""
    sd.update(num_samples=0, elements=0, apoz_samples=0, positive=torch.zeros(C, dtype=torch.int64))


def swap_threshold_columns(sd, tmp_path):
    sd["pass2_counts"] = sd["pass2_counts"].flip(1)


def idle_second_pass(sd, tmp_path):
    sd.update(pass2_samples=0, pass2_counts=torch.zeros_like(sd["pass2_counts"]))


def truncate_file(sd, tmp_path):
    with open(sd["memmap_path"], "r+b") as f:
        f.truncate(10 * C * 4)


def memmap_path_object(sd, tmp_path):
    from pathlib import Path

    sd["memmap_path"] = Path(sd["memmap_path"])


# (mode, broken state, message fragment); modes: exact | memmap | histogram | none | two_pass
CASES = {
    "format": ("none", set_("format", 2), "not a ChannelStats state dict"),
    "missing header field": ("none", delete("num_samples"), r"missing field\(s\) \['num_samples'\]"),
    "missing statistic": ("histogram", delete("nan_samples"), r"missing field\(s\) \['nan_samples'\]"),
    "missing mode field": ("exact", delete("maxima"), r"missing field\(s\) \['maxima'\]"),
    "unknown field": ("exact", set_("extra", 1), r"unexpected field\(s\) \['extra'\]"),
    "two-pass field without reference": ("none", set_("pass2_samples", 0), "two-pass fields come with 'reference'"),
    "negative num_samples": ("none", set_("num_samples", -1), "field 'num_samples' must be a non-negative int, got -1"),
    "float num_samples": ("none", set_("num_samples", 25.0),
        "field 'num_samples' must be a non-negative int, got 25.0"),
    "negative elements": ("none", set_("elements", -4), "field 'elements' must be a non-negative int"),
    "apoz_samples above num_samples": ("none", set_("apoz_samples", N + 1),
        r"'apoz_samples' \(26\) must be <= num_samples"),
    "elements without apoz samples": ("none", set_("apoz_samples", 0), "field 'elements' is 400 but apoz_samples is 0"),
    "num_channels not positive": ("none", set_("num_channels", 0), "'num_channels' must be a positive int or None"),
    "num_channels against shapes": ("none", set_("num_channels", 8),
        r"field 'max' must be a torch.float32 tensor of shape \(8,\)"),
    "num_channels None with statistics": ("none", set_("num_channels", None),
        "'num_channels' is None but the state holds"),
    "max dtype": ("none", set_("max", torch.zeros(C, dtype=torch.float64)), "got torch.float64 of shape"),
    "counts not a tensor": ("none", set_("nan_samples", [0] * C),
        "field 'nan_samples' must be a torch.int64 tensor.*got list"),
    "max NaN": ("none", set_at("max", 1, float("nan")),
        "field 'max' must not be NaN .*; not so at channel 1 \\(value nan\\)"),
    "max negative": ("none", set_at("max", 1, -0.5), r"field 'max' must be >= 0; not so at channel 1 \(value -0.5\)"),
    "nan_samples negative": ("none", set_at("nan_samples", 4, -1),
        "field 'nan_samples' must be >= 0; not so at channel 4"),
    "inf_samples negative": ("none", set_at("inf_samples", 4, -1), "field 'inf_samples' must be >= 0"),
    "positive negative": ("none", set_at("positive", 4, -1), "field 'positive' must be >= 0"),
    "NaN and Inf above num_samples": ("none", set_at("nan_samples", INF_CHANNEL, N),
        r"'nan_samples' \+ 'inf_samples' must be <= num_samples \(25\)"),
    "Inf max without Inf samples": ("none", set_at("inf_samples", INF_CHANNEL, 0),
        "'max' is \\+Inf, so 'inf_samples' must be > 0"),
    "Inf samples with a finite max": ("none", set_at("inf_samples", 5, 1),
        "'inf_samples' is > 0, so 'max' must be \\+Inf; not so at channel 5"),
    "positive above elements": ("none", set_at("positive", 4, 10**6), r"field 'positive' must be <= elements \(400\)"),
    "max without samples": ("clean none", no_samples, "field 'max' must be 0 while num_samples is 0"),
    "statistics claimed without max": ("empty", set_("num_samples", 3), "num_samples is 3 .* holds no statistics"),
    # The value range (min / max of the activations): all three fields or none, consistent.
    "partial range fields": ("none", delete("value_max"), r"missing field\(s\) \['value_max'\]"),
    "range_samples above num_samples": ("none", set_("range_samples", N + 1),
        r"field 'range_samples' \(26\) must be <= num_samples \(25\)"),
    "range_samples not an int": ("none", set_("range_samples", 2.0), "field 'range_samples' must be a non-negative int"),
    "value_min dtype": ("none", set_("value_min", torch.zeros(C, dtype=torch.float64)),
        r"field 'value_min' must be a torch.float32 tensor of shape \(9,\)"),
    "value_min NaN": ("none", set_at("value_min", 1, float("nan")),
        "fields 'value_min' / 'value_max' must not be NaN .*; not so at channel 1"),
    "value_min above value_max": ("none", set_at("value_min", 4, 100.0),
        r"field 'value_min' must be <= 'value_max'; not so at channel 4 \(value 100.0\)"),
    "range beyond the corpus max": ("none", scale_at("value_max", 4, 2.0),
        r"max\(-'value_min', 'value_max'\) must be <= 'max' .*; not so at channel 4"),
    "range without range samples": ("none", set_("range_samples", 0),
        "fields 'value_min' / 'value_max' must be \\+inf / -inf while range_samples is 0"),
    # "exact": the stored maxima are the evidence for every counter.
    "maxima shape": ("exact", lambda sd, p: sd.update(maxima=sd["maxima"][:-1]),
        r"'maxima' must be a torch.float32 tensor of shape \(25, 9\)"),
    "zeroed NaN count (exact)": ("exact", set_at("nan_samples", NAN_CHANNEL, 0),
        "'nan_samples' must count the NaN samples in 'maxima'; not so at channel 2"),
    "Inf count (exact)": ("exact", set_at("inf_samples", INF_CHANNEL, 2),
        "'inf_samples' must count the Inf samples in 'maxima'"),
    "negative flag": ("exact", set_at("negative", 0, True), "'negative' must flag the channels with negative 'maxima'"),
    "max against maxima": ("exact", scale_at("max", 4, 2.0),
        "'max' must be the max over samples of 'maxima' .*; not so at channel 4"),
    # "memmap": the file must hold the rows (they are not re-read).
    "memmap rows": ("memmap", set_("memmap_rows", N - 1), r"field 'memmap_rows' \(24\) must equal num_samples \(25\)"),
    "memmap file too short": ("memmap", truncate_file, "holds 360 bytes, fewer than the 25 rows x 9 channels"),
    "memmap path type": ("memmap", memmap_path_object, "field 'memmap_path' must be a str"),
    # "histogram": buckets against the counts and the max.
    "histogram shape": ("histogram", lambda sd, p: sd.update(histogram=sd["histogram"][:, :-1]),
        "field 'histogram' must be a torch.int64 tensor"),
    "histogram negative": ("histogram", set_at("histogram", (1, 0), -1),
        r"field 'histogram' must be >= 0; not so at \(channel, bucket\) \(1, 0\)"),
    "histogram row sum": ("histogram", scale_at("histogram", (0, 0), 0),
        r"every row of 'histogram' must sum to num_samples \(25\)"),
    "zeroed NaN count (histogram)": ("histogram", set_at("nan_samples", NAN_CHANNEL, 0),
        "the last bucket of 'histogram' .* must hold 'nan_samples' \\+ 'inf_samples'"),
    "max against histogram": ("histogram", scale_at("max", 4, 4.0),
        "field 'max' must lie in the highest occupied finite bucket"),
    # two-pass: the reference, its thresholds and the counts against it.
    "reference NaN": ("two_pass", set_at("reference", 1, float("nan")), "field 'reference' must be finite and >= 0"),
    "reference shape": ("two_pass", set_("reference", torch.zeros(C + 1)),
        r"field 'reference' must be a torch.float32 tensor of shape \(9,\)"),
    "thresholds duplicate": ("two_pass", set_("thresholds", (1e-3, 1e-3)),
        "field 'thresholds' must be distinct positive finite numbers"),
    "thresholds negative": ("two_pass", set_("thresholds", (-1e-3, 0.3)),
        "field 'thresholds' must be distinct positive finite"),
    "pass2_samples above num_samples": ("two_pass", set_("pass2_samples", N + 1),
        r"field 'pass2_samples' \(26\) must be <= num_samples"),
    "pass2_counts shape": ("two_pass", lambda sd, p: sd.update(pass2_counts=sd["pass2_counts"][:, :1]),
        r"'pass2_counts' must be a torch.int64 tensor of shape \(9, 2\)"),
    "pass2_counts negative": ("two_pass", set_at("pass2_counts", (4, 0), -1),
        r"'pass2_counts' must lie in \[0, pass2_samples\] = \[0, 25\]"),
    "pass2_counts above pass2_samples": ("two_pass", set_at("pass2_counts", (4, 0), N + 1),
        r"'pass2_counts' must lie in \[0, pass2_samples\]"),
    "pass2_counts decreasing": ("two_pass", swap_threshold_columns,
        "'pass2_counts' must not decrease as the threshold grows"),
    "pass2_max NaN": ("two_pass", set_at("pass2_max", 1, float("nan")), "field 'pass2_max' must be >= 0 and not NaN"),
    "pass2_max above max": ("two_pass", scale_at("pass2_max", 4, 2.0),
        "field 'pass2_max' must be <= 'max'; not so at channel 4"),
    "pass2_max without pass2 samples": ("two_pass", idle_second_pass,
        "field 'pass2_max' must be 0 while pass2_samples is 0"),
}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_state_dict_rejects_a_broken_state(case, tmp_path):
    mode, mutate, message = CASES[case]
    if mode == "empty":
        mode, sd = "none", ChannelStats(selectivity="none").state_dict()
    elif mode == "clean none":
        mode, sd = "none", fed("none", tmp_path, finite=True).state_dict()
    else:
        sd = fed(mode, tmp_path).state_dict()
    stats = target(mode, tmp_path)
    stats.load_state_dict(dict(sd))  # the unbroken state loads
    kept = stats.state_dict()
    mutate(sd, tmp_path)
    with pytest.raises(StateDictError, match=message) as err:
        stats.load_state_dict(sd)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert str(err.value).startswith("ChannelStats.load_state_dict: ")
    assert_same_state(stats.state_dict(), kept)  # checked before anything changed


# ---------------------------------------------------------------- SparsityTracker
def two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU())
    return model.eval()


def tracker_state(model: nn.Module) -> dict:
    """The state of a tracker (features "1" and "3") after one measured forward."""
    with SparsityTracker(model, selectivity="exact") as tracker:
        with torch.no_grad():
            model(torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return tracker.state_dict()


def feature_entry(key, value, index=0):
    def mutate(sd):
        sd["features"][index] = dict(sd["features"][index], **{key: value})
    return mutate


def drop_layer(sd):
    sd["features"].pop(1)
    del sd["stats"]["3"]


def extra_layer(sd):
    sd["features"].append(dict(sd["features"][1], name="extra"))
    sd["stats"]["extra"] = sd["stats"]["3"]


def layer_field(name, key, index, value):
    def mutate(sd):
        sd["stats"][name][key] = sd["stats"][name][key].clone()
        sd["stats"][name][key][index] = value
    return mutate


def set_top(key, value):
    def mutate(sd):
        sd[key] = value
    return mutate


TRACKER_CASES = {
    "format": (set_top("format", 0), "not a SparsityTracker state dict"),
    "missing field": (lambda sd: sd.pop("steps"),
        r"expected the fields \['features', 'format', 'manual_steps', 'stats', 'steps'\]"),
    "negative steps": (set_top("steps", -3), "field 'steps' must be a non-negative int, got -3"),
    "manual_steps not a bool": (set_top("manual_steps", "yes"), "field 'manual_steps' must be a bool"),
    "features not a list": (set_top("features", {}), "field 'features' must be a list"),
    "invalid feature": (feature_entry("kind", "attention"),
        "field 'features' holds an invalid feature .*kind must be one of"),
    "feature of another model": (feature_entry("call_index", 5),
        r"feature '1' differs from this tracker's in call_index \(5 in the state, 0 here\): a state of another model"),
    "feature named twice": (lambda sd: sd["features"].append(sd["features"][0]), "names a feature twice"),
    "stats against features": (lambda sd: sd["stats"].pop("3"),
        r"field 'stats' has statistics for \['1'\], field 'features' lists \['1', '3'\]"),
    "layer missing": (drop_layer, r"the state has no statistics for \['3'\]"),
    "unknown layer": (extra_layer, "this tracker has no feature 'extra'"),
    "broken layer": (layer_field("3", "nan_samples", 0, -1),
        "layer '3': ChannelStats.load_state_dict: field 'nan_samples' must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(TRACKER_CASES))
def test_tracker_load_state_dict_rejects_a_broken_state(case):
    mutate, message = TRACKER_CASES[case]
    model = two_layer_model()
    sd = tracker_state(model)
    tracker = SparsityTracker(model, selectivity="exact")
    tracker.load_state_dict(sd)  # the unbroken state loads
    kept = tracker.state_dict()
    broken = dict(sd, features=[dict(f) for f in sd["features"]], stats=dict(sd["stats"]))
    mutate(broken)
    with pytest.raises(StateDictError, match=message) as err:
        tracker.load_state_dict(broken)
    assert "\n" not in str(err.value) and str(err.value).startswith("SparsityTracker.load_state_dict: ")
    # Checked before anything changed: in particular layer "1" was not loaded before "3" failed.
    now = tracker.state_dict()
    assert now["steps"] == kept["steps"] and now["features"] == kept["features"]
    for name in kept["stats"]:
        assert_same_state(now["stats"][name], kept["stats"][name])


def test_tracker_rejects_a_layer_whose_nan_count_was_zeroed():
    """The release finding: a zeroed NaN count turned a NaN channel into a "dead" one."""
    model = two_layer_model()
    with torch.no_grad():
        model[1].bias[2] = float("nan")
    sd = tracker_state(model)
    assert sd["stats"]["1"]["nan_samples"][2] == 6
    sd["stats"]["1"]["nan_samples"][2] = 0
    with pytest.raises(StateDictError, match="layer '1': .*'nan_samples' must count the NaN samples in 'maxima'; "
                                             "not so at channel 2"):
        SparsityTracker(model, selectivity="exact").load_state_dict(sd)


# ---------------------------------------------------------------- distributed two-pass
def distributed_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """Rank 1's loader yields one batch fewer in pass 2; every rank must raise, none may hang."""
    from sparsekern.models import build_model
    from sparsekern.stats.analyze import CorpusChangedError, analyze

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model("basicnet", in_channels=1, num_classes=10, width=0.25)
        batches = [torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(10 * rank + i)) for i in range(2)]
        loader = PerPassLoader(batches, batches if rank == 0 else batches[:1])
        try:
            analyze(model, loader, selectivity="two-pass", progress=False)
            outcome = "no error"
        except CorpusChangedError as exc:
            outcome = str(exc)
        dist.barrier()  # every rank got here: nobody is waiting in a collective of analyze
        with open(out_file, "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def test_two_pass_corpus_change_on_one_rank_raises_on_every_rank(tmp_path):
    outs = run_ranks(__file__, 2, tmp_path, ".txt")
    rank0, rank1 = (out.read_text() for out in outs)
    assert "pass 2 yielded fewer batches, 1 (4 images) against 2 (8 images) in pass 1: batch 1 is missing" in rank1
    assert "the loader of rank(s) [1] yielded different batches in pass 2" in rank0


if __name__ == "__main__":
    distributed_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
