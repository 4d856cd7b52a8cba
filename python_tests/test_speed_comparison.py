"""Timing set-up of dense-versus-pruned comparisons: the inference copy (BN folded, in-place ReLU)
computes what the model computes, subnormal weights are counted, and timing runs with subnormals
flushed to zero (plus one unflushed row where the models hold subnormals)."""
import pytest
import torch

from sparsekern.models import ConvBNReLU, build_model
from sparsekern.prune import PrunePlan, prune_model
from sparsekern.bench import flush_denormals, inference_model, speed_comparison, subnormal_parameters, time_models

SUBNORMAL = 1e-40  # below float32's smallest normal number, 1.18e-38


def flushing_now() -> bool:
    """Whether CPU float ops currently flush subnormals: 1e-40 * 1 survives only when they do not."""
    return float(torch.tensor([SUBNORMAL]) * 1.0) == 0.0


def random_basicnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model("basicnet", in_channels=1, num_classes=10, width=0.125).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def test_inference_model_folds_bn_and_makes_unit_relus_in_place_without_changing_outputs():
    net = random_basicnet()
    x = torch.randn(6, 1, 28, 28)
    ready = inference_model(net)
    units = [m for m in ready.modules() if isinstance(m, ConvBNReLU)]
    assert units and all(isinstance(u.bn, torch.nn.Identity) and u.relu.inplace for u in units)
    assert not any(u.relu.inplace for u in net.modules() if isinstance(u, ConvBNReLU)), "original was modified"
    with torch.no_grad():
        want = net(x)
        got = ready(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_subnormal_parameters_counts_exactly_the_planted_ones():
    net = random_basicnet()
    assert subnormal_parameters(net) == 0
    with torch.no_grad():
        net.features.c3.conv.weight.view(-1)[:7] = SUBNORMAL
        net.features.c3.conv.weight.view(-1)[7] = -SUBNORMAL
        net.features.c3.bn.weight[1] = 0.0  # zero is not subnormal
        net.features.c3.bn.running_mean[1] = 2e-39
    assert subnormal_parameters(net) == 9
    x = torch.randn(3, 1, 28, 28)
    zeroed, kept = inference_model(net), inference_model(net, subnormals="keep")
    assert subnormal_parameters(kept) == 8 and subnormal_parameters(zeroed) == 0  # BN folded: its buffers are gone
    assert subnormal_parameters(net) == 9, "the original was modified"
    with torch.no_grad():
        torch.testing.assert_close(zeroed(x), kept(x), rtol=0, atol=1e-30)
    with pytest.raises(ValueError, match="subnormals"):
        inference_model(net, subnormals="flush")


def test_flush_denormals_flushes_inside_the_block_only():
    assert not flushing_now()
    with flush_denormals() as on:
        assert flushing_now() == on
    assert not flushing_now()
    with flush_denormals(False) as on:
        assert on is False and not flushing_now()


def test_time_models_flushes_subnormals_unless_asked_not_to():
    seen = []

    def timer(candidates, *, device, rounds):
        seen.append(flushing_now())
        return {name: {"median_s": 1.0} for name in candidates}

    model = {"m": torch.nn.Identity()}
    time_models(model, (1, 1, 2, 2), device=torch.device("cpu"), timer=timer)
    time_models(model, (1, 1, 2, 2), device=torch.device("cpu"), timer=timer, flush_denormal=False)
    with flush_denormals() as on:
        pass
    assert seen == [on, False]
    assert not flushing_now()


def test_speed_comparison_adds_an_unflushed_row_when_dense_holds_subnormals():
    dense = random_basicnet()
    with torch.no_grad():  # kill two C6 filters the way L2 leaves them: subnormal weights, beta < 0
        dense.features.c6.conv.weight[:2] = SUBNORMAL
        dense.features.c6.bn.weight[:2] = 1.0  # folding multiplies the weights by gamma / sigma: keep them tiny
        dense.features.c6.bn.running_var[:2] = 1.0
        dense.features.c6.bn.running_mean[:2] = 0.0
        dense.features.c6.bn.bias[:2] = -1.0
    dead = torch.zeros(dense.features.c6.conv.out_channels, dtype=torch.bool)
    dead[:2] = True
    plan = PrunePlan.from_dead_masks({"features.c6.conv": dead}, model=dense)
    pruned, _ = prune_model(dense, plan, torch.randn(4, 1, 28, 28))
    flushed = {}

    def timer(candidates, *, device, rounds):
        # A fake clock: pruned takes 60% of dense's time; record the flush state of each call.
        flushed.setdefault(tuple(sorted(candidates)), []).append(flushing_now())
        return {name: {"median_s": 0.6 if name == "pruned" else 1.0} for name in candidates}

    result = speed_comparison(dense, pruned, (1, 28, 28), batch_sizes=(2,), compile=False, timer=timer,
                              rounds=3, log=lambda m: None)
    assert result["subnormal_parameters"]["dense"] == 2 * dense.features.c6.conv.weight[0].numel()
    assert result["subnormal_parameters"]["pruned"] == 0
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["eager", "eager, subnormals"]
    with flush_denormals() as on:
        pass
    assert flushed[("dense", "dense fused bn-relu", "pruned")] == [on]
    assert flushed[("dense", "pruned")] == [False]
    for row in result["rows"]:
        assert row["time_saved"] == pytest.approx(0.4)
        assert row["criterion_met"] == (0.4 >= 0.7 * row["flops_saved"])
    clean = speed_comparison(pruned, pruned, (1, 28, 28), batch_sizes=(2,), compile=False, fused=False,
                             timer=timer, rounds=3, log=lambda m: None)
    assert [r["mode"] for r in clean["rows"]] == ["eager"]


def test_interleaved_timer_takes_turns_and_reports_median_and_deciles(monkeypatch):
    """A fake clock: a call of "a" takes 1 ms, of "b" 3 ms, plus a drift of k ms in timed round k that
    both see alike (the point of interleaving); the timer reports the clock's numbers per call."""
    import sparsekern.bench.timing as timing

    clock, calls = [0.0], []
    untimed = 6  # 2 warmup calls and 1 probe call (calls per round) each

    def candidate(name, cost):
        def call():
            drift_ms = max(0, len(calls) - untimed) // 2  # the timed round this call belongs to
            calls.append(name)
            clock[0] += cost + 1e-3 * drift_ms
        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    result = timing.interleaved_timer({"a": candidate("a", 1e-3), "b": candidate("b", 3e-3)}, device="cpu",
                                      rounds=5, min_round_s=0.0, warmup=2)
    assert calls == ["a", "a", "b", "b", "a", "b"] + ["a", "b"] * 5  # one call per round each, taking turns
    for name, cost in (("a", 1e-3), ("b", 3e-3)):
        r = result[name]  # rounds took cost + 0, 1, 2, 3, 4 ms
        assert r["rounds"] == 5
        assert r["median_s"] == pytest.approx(cost + 2e-3, rel=1e-9)
        assert r["p20_s"] == pytest.approx(cost + 0.2e-3, rel=1e-9)  # statistics.quantiles' deciles
        assert r["p80_s"] == pytest.approx(cost + 3.8e-3, rel=1e-9)
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_timer({"a": candidate("a", 1e-3)}, device="cpu", rounds=0)
