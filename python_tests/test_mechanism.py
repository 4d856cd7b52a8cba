"""The regulariser vs loss split of gamma's update (sparsekern.train.mechanism, log_mechanism):
each step's two parts add up to the update torch's optimizer and the decoupled decay actually
made, for every supported optimizer and regulariser; SGD's parts by hand; the window sums; the
metrics.jsonl rows of a training run, and their resume; unsupported settings."""
import pytest
import torch
from torch import nn

from sparsekern.errors import ConfigError
from sparsekern.train import RunConfig, train
from sparsekern.train.loop import read_metrics
from sparsekern.train.mechanism import OPTIMIZERS, batchnorm_scales
from sparsekern.train.optim import Optimization

LR = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01, "adamax": 0.02, "rmsprop": 0.01, "adagrad": 0.05}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def steps(optimization: Optimization, model: nn.Module, n: int):
    """Run n steps; yields {BN name: (gamma before, after the optimizer, after the decay)} per step."""
    scales = batchnorm_scales(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimization.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {name: p.detach().double().clone() for name, p in scales.items()}
        optimization.step()
        yield {name: (before[name], p.detach().double()) for name, p in scales.items()}


@pytest.mark.parametrize("reg", ["l2", "wd", "none"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_parts_add_up_to_the_update_torch_made(kind, reg):
    model = small_net()
    config = RunConfig(optimizer=kind, lr=LR[kind], reg=reg, reg_strength=0.05, log_mechanism=True,
                       lr_schedule="cosine")  # a changing lr: the step's own must be used
    optimization = Optimization(config, model, total_steps=6)
    split = optimization.update_split
    assert set(split.scales) == {"1", "4"}
    totals = {name: [torch.zeros(p.numel(), dtype=torch.float64) for _ in range(2)]
              for name, p in split.scales.items()}
    for gammas in steps(optimization, model, 6):
        for name, (before, after) in gammas.items():
            loss, reg_part = split.last[name]
            # The parts are what was subtracted from gamma: their sum is the whole update.
            assert torch.allclose(loss + reg_part, before - after, rtol=1e-5, atol=1e-6), (kind, reg, name)
            if reg == "none":
                assert torch.equal(reg_part, torch.zeros_like(reg_part))
            else:
                assert reg_part.abs().max() > 0 and loss.abs().max() > 0
            totals[name][0] += loss.abs()
            totals[name][1] += reg_part.abs()
    window = split.window()
    for name, (loss, reg_part) in totals.items():
        assert window[name]["loss"] == pytest.approx(loss.tolist(), rel=1e-12)
        assert window[name]["reg"] == pytest.approx(reg_part.tolist(), rel=1e-12)
    assert all(v == 0.0 for part in split.window().values() for values in part.values() for v in values)


def test_sgd_parts_by_hand():
    """Plain SGD with L2: loss part lr * dL/dgamma, regulariser part lr * lambda * gamma."""
    model = small_net()
    optimization = Optimization(RunConfig(optimizer="sgd", lr=0.1, reg="l2", reg_strength=0.05,
                                          log_mechanism=True), model, total_steps=1)
    bn = model[4]
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    grad, gamma = bn.weight.grad.double().clone(), bn.weight.detach().double().clone()
    optimization.step()
    loss, reg = optimization.update_split.last["4"]
    assert torch.allclose(loss, 0.1 * grad, rtol=1e-12, atol=0)
    assert torch.allclose(reg, 0.1 * 0.05 * gamma, rtol=1e-12, atol=0)


def test_adam_scales_the_regulariser_of_a_channel_without_loss_gradient():
    """The hypothesis' mechanism in miniature: a channel whose loss gradient is 0 (here: its gamma's
    gradient zeroed, as for a feature inactive on the batch) gets Adam steps of size ~lr from the
    penalty alone, while SGD's stay lr * lambda * gamma."""
    parts = {}
    for kind in ("adam", "momentum"):
        model = small_net()
        optimization = Optimization(RunConfig(optimizer=kind, lr=0.01, reg="l2", reg_strength=1e-3,
                                              log_mechanism=True), model, total_steps=50)
        for _ in steps_with_silent_channel(optimization, model, 50):
            pass
        parts[kind] = optimization.update_split.window()["4"]
    adam, sgd = parts["adam"], parts["momentum"]
    assert adam["loss"][0] == 0.0 and sgd["loss"][0] == 0.0
    assert adam["reg"][0] > 0.3 * 50 * 0.01  # normalised by its own (penalty-only) second moment
    assert sgd["reg"][0] < 50 * 0.01 * 1e-3 * 2 / (1 - 0.9)  # lr * lambda * |gamma| per step, momentum-amplified
    assert adam["reg"][0] / max(adam["loss"][1:]) > sgd["reg"][0] / max(sgd["loss"][1:])


def steps_with_silent_channel(optimization, model, n):
    g = torch.Generator().manual_seed(2)
    for _ in range(n):
        x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimization.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        model[4].weight.grad[0] = 0.0
        optimization.step()
        yield


def test_training_logs_the_split_next_to_selectivity_and_resumes(tmp_path):
    common = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=64, num_test_samples=32,
                  eval_batch_size=32, threads=1, steps=12, eval_every=4, optimizer="adam", lr=0.01, reg="l2",
                  reg_strength=0.01, log_mechanism=True)
    reference = RunConfig(**common, out_dir=str(tmp_path / "a"))
    train(reference, progress=False, log=lambda m: None)
    lines = read_metrics(reference.run_dir())
    assert [m["step"] for m in lines] == [4, 8, 12]
    rows = lines[0]["mechanism"]
    assert len(rows) == 7  # BasicNet's seven Conv-BN-ReLU features
    for name, row in rows.items():
        channels = len(row["reg_update"])
        assert len(row["loss_update"]) == len(row["selectivity"]) == len(row["window_max"]) == channels
        assert all(v > 0 for v in row["reg_update"])
        assert all(s is None or 0.0 <= s <= 1.0 for s in row["selectivity"])
    # Resumed from the step-4 checkpoint: the same rows (the split's state is in the checkpoint).
    resumed = RunConfig(**common, out_dir=str(tmp_path / "b"))
    assert train(resumed, stop_after=4, progress=False, log=lambda m: None) is None
    train(resumed, progress=False, log=lambda m: None)
    assert [m["mechanism"] for m in read_metrics(resumed.run_dir())] == [m["mechanism"] for m in lines]
    # The option joins the run's identity only when set: older run ids stay valid.
    plain = {k: v for k, v in common.items() if k != "log_mechanism"}
    assert "log_mechanism" not in RunConfig(**plain).identity()
    assert RunConfig(**plain).run_id() != reference.run_id()


@pytest.mark.parametrize("changes, message", [
    (dict(optimizer="adadelta"), "optimizer='adadelta' is not supported"),
    (dict(optimizer="slbi"), "optimizer='slbi' is not supported"),
    (dict(reg="cges", reg_strength=1e-3), "reg='cges' is not supported"),
])
def test_unsupported_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(log_mechanism=True, **changes)
    RunConfig(**changes)  # fine without the log
