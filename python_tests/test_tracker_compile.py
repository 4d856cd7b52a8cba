"""SparsityTracker under torch.compile(fullgraph=True): no graph break, and the statistics of the
activations the compiled model computed.

Two independent references, both on the SAME activations as the tracker (never hard-coded
numbers, so any CPU rounding holds):
- ``aot_eager`` runs the very aten kernels of eager mode, so a compiled tracker must equal an eager
  tracker on an identical model copy bit for bit (eval, and a training step: forward + backward +
  optimizer step, then the next forward);
- with inductor (its own conv/BN rounding), reference forward hooks that compute the statistics
  with plain torch ops inside the same compiled graph (``torch.amax`` etc., written in place into
  preallocated tensors) see the same activations as the tracker.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn as nn
import torch.nn.functional as F

from sparsekern import SparsityTracker
from sparsekern.models import BasicNet
from sparsekern.stats.stores.histogram import HistogramStore

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _basicnet():
    torch.manual_seed(0)
    return BasicNet(width=0.125)


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _inputs(model, steps=3, n=4):
    g = torch.Generator().manual_seed(1)
    shape = (1, 16, 16) if isinstance(model, BasicNet) else (3, 32, 32)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)]


def _stats(tracker):
    out = {}
    for name, s in tracker.stats.items():
        if s.num_samples == 0:
            out[name] = (0,)
            continue
        sd = s.state_dict()
        out[name] = tuple(sd[k] for k in ("max", "nan_samples", "inf_samples", "positive", "value_min", "value_max",
                                          "histogram")) + (s.num_samples, s._elements)
    return out


def _assert_equal_stats(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for u, v in zip(a[name], b[name]):
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v), name
            else:
                assert u == v, name


def _run(model, tracker_kwargs, data, train, compile_backend=None):
    tracker = SparsityTracker(model, **tracker_kwargs)
    model.train(train)
    run = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in data:
        if train:
            loss = F.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                run(x)
    return tracker


def _no_graph_breaks():
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


@pytest.mark.parametrize("make,train", [
    (_basicnet, False), (_basicnet, True), (_resnet, False),
    pytest.param(_resnet, True, marks=pytest.mark.slow),  # ~30 s of compiling on 2 cores
], ids=["basicnet-eval", "basicnet-train", "resnet18-eval", "resnet18-train"])
def test_compiled_tracker_equals_eager(make, train):
    """aot_eager: the same kernels as eager, so the statistics must be identical bit for bit."""
    model = make()
    data = _inputs(model)
    eager = _run(copy.deepcopy(model), {}, data, train)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = _run(model, {}, data, train, compile_backend=cnt)
    _no_graph_breaks()
    # the model's forward: one graph with the allocation of the statistics, then the steady state;
    # the tracker's pre-hook on the top module is a frame of its own
    assert cnt.frame_count <= 3
    assert compiled.steps == eager.steps == len(data)
    _assert_equal_stats(_stats(compiled), _stats(eager))
    assert all(s.num_samples == 4 * len(data) for s in compiled.stats.values())


def test_every_k_and_manual_steps_compiled():
    model = _basicnet()
    data = _inputs(model, steps=5)
    eager = _run(copy.deepcopy(model), {"every": 2}, data, False)
    compiled = _run(model, {"every": 2}, data, False, compile_backend="aot_eager")
    _no_graph_breaks()
    _assert_equal_stats(_stats(compiled), _stats(eager))
    assert all(s.num_samples == 4 * 3 for s in compiled.stats.values())  # steps 0, 2, 4
    # step(): from now on only step() advances the counter (one recompile: a python flag changed)
    x = data[0][0]
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        compiled.step()  # counter 5 -> 6
        compiled_model(x)  # measured (6 % 2 == 0), and forwards no longer advance the counter
        compiled_model(x)  # measured again
        compiled.step()  # 7
        compiled_model(x)  # not measured
        compiled.step()  # 8
        compiled_model(x)  # measured
    assert compiled.steps == 8
    assert all(s.num_samples == 4 * (3 + 3) for s in compiled.stats.values())
    _no_graph_breaks()


class _Reference:
    """Forward hooks computing the tracker's statistics with plain torch ops, in place into
    preallocated tensors, so they trace into the same compiled graph as the tracker."""

    def __init__(self, model, tracker, steps, n):
        self.steps = steps
        self.step = torch.zeros((), dtype=torch.int64)
        self.data = {}
        modules = dict(model.named_modules())
        assert not any(f.functional for f in tracker.features)
        self._handles = []
        self._calls = {}
        for name in {f.hook_module_name for f in tracker.features}:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        model.register_forward_pre_hook(self._pre)
        self.n = n

    def _pre(self, module, args):
        self._calls = {}

    def _hook(self, name):
        def hook(module, args, out):
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = name if call == 0 else f"{name}:{call}"
            with torch.no_grad():
                a = out.detach()
                m = a.abs().amax(dim=(2, 3)).float()
                if key not in self.data:
                    c = a.shape[1]
                    self.data[key] = {"m": torch.zeros(self.steps, self.n, c), "pos": torch.zeros(c, dtype=torch.int64),
                                      "lo": torch.full((c,), float("inf")), "hi": torch.full((c,), float("-inf"))}
                d = self.data[key]
                d["m"].index_copy_(0, self.step.reshape(1), m.unsqueeze(0))
                d["pos"].add_((a > 0).sum(dim=(0, 2, 3)))
                torch.minimum(d["lo"], a.amin(dim=(0, 2, 3)).float(), out=d["lo"])
                torch.maximum(d["hi"], a.amax(dim=(0, 2, 3)).float(), out=d["hi"])
        return hook


def _feature_key(f):
    return f.hook_module_name if not f.call_index else f"{f.hook_module_name}:{f.call_index}"


# Inductor compiles take 1-4 minutes each on 2 cores: a training step of BasicNet and an eval pass
# of ResNet-18 (residual adds, functional ReLU) cover what the other two combinations would. The
# reference hooks run inside the same graph, so the result does not depend on the CPU's rounding:
# CI runs these once (marker ``once``), not again under its second rounding setting.
@pytest.mark.slow
@pytest.mark.once
@pytest.mark.parametrize("make,train", [(_basicnet, True), (_resnet, False)], ids=["basicnet-train", "resnet18-eval"])
def test_inductor_tracker_equals_reference_hooks(make, train):
    model = make()
    data = _inputs(model, steps=2)
    tracker = SparsityTracker(model)
    ref = _Reference(model, tracker, len(data), 4)
    model.train(train)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        if train:
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                compiled(x)
        ref.step += 1
    _no_graph_breaks()
    for f in tracker.features:
        s, d = tracker.stats[f.name], ref.data[_feature_key(f)]
        m = d["m"].reshape(-1, d["m"].shape[-1])
        assert s.num_samples == m.shape[0]
        assert torch.equal(s.corpus_max, m.amax(dim=0)), f.name
        assert torch.equal(s._counters.positive, d["pos"]), f.name
        assert torch.equal(s.value_min, d["lo"]) and torch.equal(s.value_max, d["hi"]), f.name
        hist = HistogramStore(s.histogram_mantissa_bits)
        hist.start(m.shape[1], m.device)
        hist.update(m)
        assert torch.equal(s.state_dict()["histogram"], hist.counts), f.name


def test_exact_mode_under_compile_says_why():
    model = _basicnet().eval()
    SparsityTracker(model, selectivity="exact")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="keeps every per-sample maximum"):
        with torch.no_grad():
            compiled(torch.randn(2, 1, 16, 16))


def test_tracker_without_compile_breaks_nothing_in_a_plain_model():
    """The hooks of a removed tracker leave nothing behind in the compiled graph."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    tracker = SparsityTracker(model)
    tracker.remove()
    cnt = torch._dynamo.testing.CompileCounter()
    torch.compile(model, backend=cnt, fullgraph=True)(torch.randn(2, 1, 8, 8))
    assert cnt.op_count > 0 and "channel_stats_update_" not in str(cnt.graphs[0].code if hasattr(cnt, "graphs") else "")
