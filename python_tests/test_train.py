"""sparsekern.train: config validation and TOML, L2 vs decoupled weight decay update rules
(hand-computed in float64), one run's files, resume equals an uninterrupted run, bad checkpoints."""
import json
import sys
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsekern.train import CheckpointError, ConfigError, RunConfig, TrainingDivergedError, train
from sparsekern.train.optim import Optimization, ScheduleFactor, split_parameters

# A tiny, fast run on the synthetic dataset: 64 training samples, batch 8 -> 8 steps per epoch.
TINY = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=64, num_test_samples=32,
            eval_batch_size=32, threads=1)


def tiny(tmp_path, **changes) -> RunConfig:
    return RunConfig(**{**TINY, "steps": 12, "eval_every": 4, "out_dir": str(tmp_path), **changes})


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "adamw", "optimizer='adamw'"),
    ("reg", "l3", "reg='l3'"),
    ("lr", 0.0, "lr=0.0"),
    ("lr", float("nan"), "lr=nan"),
    ("width", -1.0, "width=-1.0"),
    ("batch_size", 0, "batch_size=0"),
    ("steps", 0, "steps=0"),
    ("steps", 2.5, "steps=2.5"),
    ("batch_size", True, "batch_size=True"),
    ("lr", "fast", "lr='fast'"),
    ("lr_schedule", "linear", "lr_schedule='linear'"),
    ("lr_milestones", (0.75, 0.5), "lr_milestones"),
    ("momentum", 1.0, "momentum=1.0"),
    ("device", "tpu", "device='tpu'"),
    ("name", "a/b", "name='a/b'"),
    ("reg_strength", -1e-4, "reg_strength=-0.0001"),
    ("selectivity", "approx", "selectivity='approx'"),
])
def test_invalid_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(**{field: value})
    assert message in str(info.value)


def test_zero_strength_needs_reg_none_and_none_ignores_strength():
    with pytest.raises(ConfigError, match="reg_strength=0.0"):
        RunConfig(reg="l2", reg_strength=0.0)
    assert RunConfig(reg="none", reg_strength=5e-4).reg_strength == 0.0


def test_toml_round_trip_and_unknown_keys(tmp_path):
    config = RunConfig(model="vgg11", width=0.5, optimizer="adamax", lr=3e-5, reg="wd", reg_strength=1e-4,
                       reg_bn=False, steps=1234, lr_schedule="step", lr_milestones=(0.25, 0.8), seed=7,
                       num_train_samples=100, data_root="/data/x y", track_selectivity=True)
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    assert RunConfig.from_toml(path) == config
    # [run] table form, and overrides on top of the file
    path.write_text("[run]\n" + config.to_toml())
    assert RunConfig.from_toml(path, {"lr": 1e-3}) == config.replace(lr=1e-3)
    path.write_text('optimiser = "adam"\n')
    with pytest.raises(ConfigError, match="optimiser") as info:
        RunConfig.from_toml(path)
    assert str(path) in str(info.value)
    path.write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        RunConfig.from_toml(path)


def test_run_id_depends_only_on_what_is_computed():
    config = RunConfig(steps=100)
    assert config.run_id() == RunConfig(steps=100).run_id()
    assert config.run_id() == config.replace(out_dir="elsewhere", device="cpu", threads=3, name="x").run_id()
    assert config.run_id() != config.replace(lr=2e-3).run_id()
    assert config.run_id() != config.replace(seed=1).run_id()
    assert config.run_id().startswith("basicnet-w1_fashion-mnist_adam-lr0.001_l2-0.0005_b40_k100_s0_")


# ---------------------------------------------------------------------- update rules
class Vector(nn.Module):
    """One float64 parameter vector; loss = <c, w>, so the gradient is exactly c."""

    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())


W0 = torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float64)
C = torch.tensor([0.3, 0.7, -0.2, 1.1], dtype=torch.float64)


def run_steps(optimizer, reg, steps, lr=0.1, strength=0.01, schedule="step", milestones=(0.5,)):
    model = Vector(W0)
    config = RunConfig(optimizer=optimizer, reg=reg, reg_strength=strength, lr=lr, lr_schedule=schedule,
                       lr_milestones=milestones, lr_decay=0.1, steps=steps)
    opt = Optimization(config, model, total_steps=steps)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        (model.w * C).sum().backward()
        lrs.append(opt.lr)
        opt.step()
    return model.w.detach(), lrs


def adam_direction(g, m, v, t, beta1=0.9, beta2=0.999, eps=1e-8):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps), m, v


def test_schedule_factors():
    assert [ScheduleFactor("step", 4, (0.5,), 0.1)(t) for t in range(4)] == [1, 1, 0.1, 0.1]
    assert [ScheduleFactor("step", 10, (0.2, 0.6), 0.5)(t) for t in (1, 2, 5, 6, 9)] == [1, 0.5, 0.5, 0.25, 0.25]
    cosine = ScheduleFactor("cosine", 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert ScheduleFactor("constant", 10)(7) == 1.0


def test_sgd_l2_penalty_enters_the_gradient():
    w, lrs = run_steps("sgd", "l2", steps=4)
    expected = W0.clone()
    for lr in lrs:
        expected = expected - lr * (C + 0.01 * expected)
    assert lrs == [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1]
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)


def test_sgd_weight_decay_is_decoupled_and_follows_the_schedule():
    w, lrs = run_steps("sgd", "wd", steps=4)
    expected = W0.clone()
    for lr in lrs:
        expected = (expected - lr * C) * (1 - 0.01 * lr / 0.1)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)


def test_adam_l2_is_rescaled_by_the_adaptive_denominator():
    w, lrs = run_steps("adam", "l2", steps=4)
    expected, m, v = W0.clone(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, lr in enumerate(lrs, start=1):
        u, m, v = adam_direction(C + 0.01 * expected, m, v, t)
        expected = expected - lr * u
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-14)


def test_adam_weight_decay_is_decoupled_and_follows_the_schedule():
    w, lrs = run_steps("adam", "wd", steps=4)
    expected, m, v = W0.clone(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, lr in enumerate(lrs, start=1):
        u, m, v = adam_direction(C, m, v, t)  # the decay never enters the moments
        expected = (expected - lr * u) * (1 - 0.01 * lr / 0.1)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-14)


def test_adam_weight_decay_differs_from_adamw_only_by_the_order():
    """Documented relation: AdamW(weight_decay = lambda / lr_0) decays before its step, we after it."""
    lam, lr = 0.01, 0.1
    ours, _ = run_steps("adam", "wd", steps=1, lr=lr, strength=lam, schedule="constant")
    model = Vector(W0)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=lam / lr)
    (model.w * C).sum().backward()
    adamw.step()
    u, _, _ = adam_direction(C, 0.0, 0.0, 1)
    torch.testing.assert_close(ours - model.w.detach(), lam * lr * u, rtol=0, atol=1e-15)


def test_reg_bn_false_exempts_batchnorm_from_l2_and_weight_decay():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.fill_(0.7)
    regularised, exempt = split_parameters(model, reg_bn=False)
    assert {id(p) for p in exempt} == {id(model[1].weight), id(model[1].bias)}
    assert len(regularised) == 4  # conv and linear weights and biases
    assert len(split_parameters(model, reg_bn=True)[1]) == 0

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = RunConfig(optimizer="sgd", reg="wd", reg_strength=0.1, lr=0.5, reg_bn=False, steps=1)
    opt = Optimization(config, model, total_steps=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    opt.step()
    for name, p in model.named_parameters():
        factor = 1.0 if name.startswith("1.") else 0.9
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=0)
    l2 = Optimization(config.replace(reg="l2"), model, total_steps=1)
    assert sorted(g["weight_decay"] for g in l2.optimizer.param_groups) == [0.0, 0.1]


def test_proximal_regularizers_plug_in_by_name():
    """--reg lasso: the soft threshold at lr * lambda runs after each optimizer step."""
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.05, -0.3, 0.2, -0.01]]))
    config = RunConfig(optimizer="sgd", reg="lasso", reg_strength=1.0, lr=0.1, steps=1)
    opt = Optimization(config, model, total_steps=1)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), torch.tensor([[0.0, -0.2, 0.1, 0.0]]))
    assert RunConfig(reg="cges").reg == "cges"



def test_every_reg_is_one_regularizer_interface_that_the_loop_steps_with_the_lr():
    """Every --reg kind (l2, wd, slimming, the proximal ones) is a sparsekern.regularize.Regularizer;
    a plug-in registered by name gets step(lr) after each optimizer step, with that step's lr."""
    from sparsekern.regularize import Regularizer
    from sparsekern.train.optim import _REGULARIZERS, register_regularizer, regularizer_names

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 5, 5))
    names = regularizer_names()
    assert names[:4] == ["none", "l2", "wd", "slimming"] and {"cges", "lasso", "group-lasso", "ridge"} <= set(names)
    for name in names:
        config = RunConfig(optimizer="sgd", reg=name, reg_strength=0.0 if name == "none" else 1e-3, steps=1)
        assert isinstance(Optimization(config, model, total_steps=1).regularizer, Regularizer), name

    seen = []

    class Recorder(Regularizer):
        def step(self, lr=None):
            seen.append(lr)

    register_regularizer("recorder", lambda config, model, params: Recorder())
    try:
        w, lrs = run_steps("sgd", "recorder", steps=4)
        assert seen == lrs == [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1]
        expected = W0.clone()
        for lr in lrs:  # no penalty: plain SGD
            expected = expected - lr * C
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)
    finally:
        del _REGULARIZERS["recorder"]


# ---------------------------------------------------------------------- one run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run (12 steps over 1.5 epochs, with augmentation), shared by several tests."""
    config = tiny(tmp_path_factory.mktemp("runs"), augment=True)
    return config, train(config, progress=False, log=lambda m: None)


def post_relu_max(model, dataset):
    """Reference: max over samples and positions of every ReLU output of BasicNet, in float64."""
    maxima = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, name=name: maxima.__setitem__(
        name, torch.maximum(maxima.get(name, torch.zeros(out.shape[1], dtype=torch.float64)),
                            out.detach().double().abs().amax(dim=(0, 2, 3)))))
        for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            model(dataset.get_batch(torch.arange(start, min(start + 16, len(dataset))))[0])
    for h in hooks:
        h.remove()
    return maxima


def test_run_writes_metrics_checkpoint_and_result(finished_run):
    from sparsekern.data import InMemoryImageDataset, get_dataset
    from sparsekern.train.loop import load_trained, read_metrics

    config, result = finished_run
    run_dir = config.run_dir()
    assert {p.name for p in run_dir.iterdir()} >= {"config.toml", "checkpoint.pt", "metrics.jsonl", "result.json"}
    assert RunConfig.from_toml(run_dir / "config.toml") == config
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [4, 8, 12]
    assert [m["window_samples"] for m in metrics] == [32, 32, 32]
    assert all(0 <= m["test_error"] <= 1 and math.isfinite(m["train_loss"]) for m in metrics)
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert result["test_error"] == metrics[-1]["test_error"]
    assert result["steps"] == 12 and result["analysis_samples"] == 64

    # Independent reference: the checkpoint's BN scales and a plain forward over the 64 samples.
    model, _ = load_trained(run_dir, device="cpu")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    full = get_dataset("synthetic", train=True)  # the run's corpus is its first 64 samples, unaugmented
    corpus = InMemoryImageDataset(full.images[:64], full.labels[:64], mean=full.mean, std=full.std, num_classes=10)
    maxima = post_relu_max(model, corpus)
    assert len(result["layers"]) == len(bns) == 7
    for layer, bn, relu_max in zip(result["layers"], bns, maxima.values()):
        gamma = bn.weight.detach().double()
        assert layer["dead_by_gamma"] == int((gamma.abs() < 1e-3).sum())
        assert layer["dead_by_gamma_loose"] == int((gamma.abs() < 1e-2).sum())
        assert layer["gamma"] == gamma.tolist()
        assert layer["dead_mask"] == (relu_max < 1e-12).tolist()
        assert layer["dead_by_activation"] == int((relu_max < 1e-12).sum())
        assert layer["nonfinite_channels"] == int((~torch.isfinite(relu_max)).sum())
    # The last eval point is the final step: its subnormal count is the checkpoint's.
    smallest_normal = torch.finfo(torch.float32).tiny
    assert metrics[-1]["subnormal_weights"] == sum(int(((p.abs() > 0) & (p.abs() < smallest_normal)).sum())
                                                   for p in model.parameters())
    channels = sum(l["channels"] for l in result["layers"])
    dead = sum(l["dead_by_activation"] for l in result["layers"])
    assert result["total"]["channels"] == channels
    assert result["total"]["nonfinite_channels"] == sum(l["nonfinite_channels"] for l in result["layers"])
    assert result["total"]["dead_by_activation_pct"] == pytest.approx(100 * dead / channels)


def test_subnormal_weights_get_one_hint_on_cpu_unless_flushing(monkeypatch):
    from sparsekern.train import loop

    messages = []
    run = SimpleNamespace(model=nn.Linear(10, 10), device=torch.device("cpu"), log=messages.append,
                          config=SimpleNamespace(run_dir=lambda: "runs/x"))
    hint = lambda count: loop._Run._subnormal_hint(run, count)  # noqa: E731
    hint(1)  # 1 of 110 weights: under the 1% share
    assert messages == []
    hint(50)
    hint(60)
    assert len(messages) == 1 and "50 of 110 weights are subnormal" in messages[0]
    assert "SPARSEKERN_FLUSH_DENORMAL=1" in messages[0]
    quiet = SimpleNamespace(**{**vars(run), "_hinted": False})
    monkeypatch.setattr(loop, "flush_denormal_enabled", lambda: True)
    loop._Run._subnormal_hint(quiet, 50)
    assert len(messages) == 1


def test_finished_run_returns_its_result_without_training(finished_run):
    config, result = finished_run
    stamp = config.run_dir().joinpath("checkpoint.pt").stat().st_mtime_ns
    messages = []
    assert train(config, progress=False, log=messages.append) == result
    assert "already complete" in messages[0]
    assert config.run_dir().joinpath("checkpoint.pt").stat().st_mtime_ns == stamp


def test_resume_after_interruption_matches_uninterrupted_run(finished_run, tmp_path):
    from sparsekern.train.loop import read_metrics

    reference_config, _ = finished_run
    config = reference_config.replace(out_dir=str(tmp_path))
    # stop_after=3 stops at the next eval point, step 4: mid-epoch (8 steps per epoch).
    assert train(config, stop_after=3, progress=False, log=lambda m: None) is None
    state = torch.load(config.run_dir() / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert not (config.run_dir() / "result.json").exists()
    messages = []
    train(config, progress=False, log=messages.append)
    assert any("resuming at step 4/12" in m for m in messages)

    resumed = torch.load(config.run_dir() / "checkpoint.pt", weights_only=True)
    reference = torch.load(reference_config.run_dir() / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == reference["step"] == 12
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    drop_timing = lambda lines: [{k: v for k, v in m.items() if k != "seconds_per_step"} for m in lines]  # noqa: E731
    assert drop_timing(read_metrics(config.run_dir())) == drop_timing(read_metrics(reference_config.run_dir()))


def test_truncated_checkpoint_is_a_clear_error_and_restart_discards_it(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=4, progress=False, log=lambda m: None)
    path = config.run_dir() / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        train(config, progress=False, log=lambda m: None)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert "--restart" in str(info.value)
    assert train(config, restart=True, stop_after=4, progress=False, log=lambda m: None) is None
    assert torch.load(path, weights_only=True)["step"] == 4


def test_checkpoint_of_another_config_is_a_clear_error(tmp_path):
    config = tiny(tmp_path, name="shared")
    train(config, stop_after=4, progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError) as info:
        train(config.replace(lr=2e-3), progress=False, log=lambda m: None)
    message = str(info.value)
    assert "checkpoint.pt" in message and "different configuration" in message
    assert "lr: 0.001 in the checkpoint, 0.002 now" in message


def test_diverging_run_stops_with_a_clear_error(tmp_path, monkeypatch):
    import torch.nn.functional as F

    import sparsekern.train.loop as loop

    # A loss that turns NaN, as a diverging run's does.
    monkeypatch.setattr(loop, "F", SimpleNamespace(cross_entropy=lambda logits, y: F.cross_entropy(logits, y) * math.nan))
    config = tiny(tmp_path, steps=4, eval_every=2)
    with pytest.raises(TrainingDivergedError, match="training loss is nan at step 2"):
        train(config, progress=False, log=lambda m: None)


def test_tensorboard_scalars_survive_resume_once_per_eval_point(tmp_path):
    """Every eval point appears once in TensorBoard with the value metrics.jsonl holds, also when
    an attempt died after writing a step's scalars but before checkpointing it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparsekern.train.loop import read_metrics

    config = tiny(tmp_path)
    checkpoint = config.run_dir() / "checkpoint.pt"
    train(config, stop_after=4, progress=False, log=lambda m: None)
    at_step_4 = checkpoint.read_bytes()
    train(config, stop_after=8, progress=False, log=lambda m: None)
    checkpoint.write_bytes(at_step_4)  # step 8's scalars are written, its checkpoint "never happened"
    train(config, progress=False, log=lambda m: None)

    events = EventAccumulator(str(config.run_dir() / "tb"))
    events.Reload()
    metrics = read_metrics(config.run_dir())
    assert [m["step"] for m in metrics] == [4, 8, 12]
    for tag, key in (("test_error", "test_error"), ("train_loss", "train_loss"),
                     ("sparsity/dead_by_activation", "dead_by_activation")):
        want = [(m["step"], m[key] if key in m else m["total"][key]) for m in metrics]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [4, 8, 12], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag


def test_missing_tensorboard_is_one_warning_naming_the_extra(tmp_path, monkeypatch):
    from sparsekern.train.loop import _tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.warns(RuntimeWarning, match=r"sparsekern\[tensorboard\]"):
        assert _tensorboard_writer(tmp_path / "tb", 0) is None
