"""Explicit sparsity wired into training: ``--optimizer slbi`` / ``slbi-group`` (Split LBI with its
kappa / nu options, its support recorded every epoch) and the proximal ``--reg cges | lasso | ...``.

References: the Split LBI update of SCIENCE.md section 4 written out in float64; exact zero counts
of the trained weights; an uninterrupted run for the resumed ones."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from sparsekern.cli import main as cli_main
from sparsekern.train import ConfigError, RunConfig, train
from sparsekern.train.config import NOT_IDENTITY
from sparsekern.train.loop import read_metrics
from sparsekern.train.optim import Optimization

SLBI_FIELDS = {"slbi_kappa", "slbi_nu"}
# LeNet-5 on 64 synthetic samples, batch 8: 8 steps per epoch.
TINY_LENET = dict(model="lenet5", dataset="synthetic", batch_size=8, num_train_samples=64, num_test_samples=32,
                  eval_batch_size=32, analyze_samples=32, selectivity="none", threads=1, device="cpu")


def tiny_run(tmp_path, **changes) -> RunConfig:
    return RunConfig(**{**TINY_LENET, "steps": 20, "eval_every": 6, "out_dir": str(tmp_path), **changes})


# ---------------------------------------------------------------------- config
def test_slbi_options_only_exist_for_slbi_and_keep_other_run_ids():
    adam = RunConfig(steps=100)
    assert adam.slbi_kappa is None and adam.slbi_nu is None
    # Other optimizers ignore the options (canonical config), and their identity has exactly the
    # fields it had before the options existed, so existing run ids and checkpoints stay valid.
    assert RunConfig(steps=100, slbi_nu=50.0, slbi_kappa=2.0) == adam
    # ranks / sync_bn (data-parallel training) and log_mechanism join the identity only when set, likewise.
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"ranks", "sync_bn", "log_mechanism"}
    assert set(adam.identity()) == names - NOT_IDENTITY - SLBI_FIELDS
    assert "slbi_kappa" not in adam.to_toml()

    slbi = RunConfig(optimizer="slbi", reg="none", steps=100)
    assert (slbi.slbi_kappa, slbi.slbi_nu) == (1.0, 100.0)
    assert set(slbi.identity()) == names - NOT_IDENTITY
    assert slbi.run_id() != slbi.replace(slbi_nu=20.0).run_id()
    assert slbi.run_id() != slbi.replace(optimizer="slbi-group").run_id()


@pytest.mark.parametrize("field, value", [("slbi_nu", 0.0), ("slbi_kappa", -1.0), ("slbi_nu", math.inf)])
def test_invalid_slbi_option_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"{field}="):
        RunConfig(optimizer="slbi", **{field: value})


# ---------------------------------------------------------------------- the update rule
class ConvAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2).double()
        self.fc = nn.Linear(4, 3).double()


def soft_threshold(v):
    return v.sign() * (v.abs() - 1).clamp(min=0)


def row_shrink(v):
    rows = v.reshape(v.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True)
    return (rows * (1 - 1 / norms).clamp(min=0)).reshape(v.shape)


@pytest.mark.parametrize("optimizer, fc_prox", [("slbi", soft_threshold), ("slbi-group", row_shrink)])
def test_slbi_optimizer_follows_the_split_lbi_update(optimizer, fc_prox):
    """Three steps with fixed gradients against SCIENCE.md's update in float64 (kappa=2, nu=2, lr=0.3),
    its loss gradient averaged with momentum 0.5 and L2 0.01 added to it as in DessiLBI:
    b <- 0.5*b + g + wd*W, W <- W - kappa*lr*(b + (W - Gamma)/nu), V <- V + lr/nu*(W - Gamma),
    Gamma <- kappa*Prox(V); biases take momentum-SGD steps b <- 0.5*b + g + wd*w, w <- w - lr*b."""
    torch.manual_seed(0)
    model = ConvAndLinear()
    with torch.no_grad():  # one large unit per layer: its V crosses the threshold within three steps
        model.conv.weight[0] *= 10
        model.fc.weight[0] *= 10
    grads = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    lr, kappa, nu, wd, momentum = 0.3, 2.0, 2.0, 0.01, 0.5
    config = RunConfig(optimizer=optimizer, lr=lr, slbi_kappa=kappa, slbi_nu=nu, momentum=momentum, reg="l2",
                       reg_strength=wd, lr_schedule="constant", steps=3)
    opt = Optimization(config, model, total_steps=3)

    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    V = {n: torch.zeros_like(ref[n]) for n in ("conv.weight", "fc.weight")}
    G = {n: torch.zeros_like(ref[n]) for n in V}
    buffer = {n: torch.zeros_like(ref[n]) for n in ref}
    prox = {"conv.weight": row_shrink, "fc.weight": fc_prox}
    for _ in range(3):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n in ref:
            buffer[n] = momentum * buffer[n] + grads[n] + wd * ref[n]
            direction = buffer[n]
            if n in V:
                coupling = ref[n] - G[n]
                ref[n] = ref[n] - kappa * lr * (direction + coupling / nu)
                V[n] = V[n] + lr / nu * coupling
                G[n] = kappa * prox[n](V[n])
            else:
                ref[n] = ref[n] - lr * direction
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-12)
    state = opt.optimizer.state
    for n, p in model.named_parameters():
        if n in G:
            torch.testing.assert_close(state[p]["Gamma"], G[n], rtol=1e-12, atol=1e-12)
            assert G[n].ne(0).any() and G[n].eq(0).any()  # the test covers both sides of the threshold


# ---------------------------------------------------------------------- runs
@pytest.mark.parametrize("changes", [
    dict(optimizer="slbi", lr=0.1, reg="none", slbi_nu=20.0),
    dict(optimizer="slbi-group", lr=0.1, reg="l2", reg_strength=1e-3),
    dict(optimizer="momentum", lr=0.05, reg="cges", reg_strength=1e-2),
    dict(optimizer="adam", lr=1e-3, reg="lasso", reg_strength=1e-2),
])
def test_run_checkpoints_and_resumes_exactly(tmp_path, changes):
    """20 steps (2.5 epochs); the interrupted run stops at step 6, mid-epoch, and resumes."""
    reference = tiny_run(tmp_path / "whole", **changes)
    train(reference, progress=False, log=lambda m: None)
    resumed = reference.replace(out_dir=str(tmp_path / "resumed"))
    assert train(resumed, stop_after=5, progress=False, log=lambda m: None) is None
    assert torch.load(resumed.run_dir() / "checkpoint.pt", weights_only=True)["step"] == 6
    train(resumed, progress=False, log=lambda m: None)

    a = torch.load(reference.run_dir() / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed.run_dir() / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    assert_same_state(a["optimization"], b["optimization"])
    timing_free = lambda lines: [{k: v for k, v in m.items() if k != "seconds_per_step"} for m in lines]  # noqa: E731
    assert timing_free(read_metrics(reference.run_dir())) == timing_free(read_metrics(resumed.run_dir()))

    if changes["optimizer"].startswith("slbi"):
        # record_epoch ran after each of the two complete epochs and is part of the checkpoint.
        states = a["optimization"]["optimizer"]["state"].values()
        histories = [s["support_history"] for s in states if "support_history" in s]
        assert len(histories) == 5  # c1, c3, c5, f6, output weights
        assert all([epoch for epoch, _ in h] == [0, 1] for h in histories)


def assert_same_state(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def zero_fraction(run_dir) -> float:
    """Exactly-zero conv / Linear weights of a finished run, counted from its checkpoint."""
    model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    weights = [t for name, t in model.items() if name.endswith("weight") and t.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_cges_zeroes_weights_where_plain_training_does_not(tmp_path):
    plain = tiny_run(tmp_path, optimizer="momentum", lr=0.05, reg="none")
    cges = plain.replace(reg="cges", reg_strength=0.05)
    for config in (plain, cges):
        train(config, progress=False, log=lambda m: None)
    assert zero_fraction(plain.run_dir()) == 0.0
    assert zero_fraction(cges.run_dir()) > 0.05


def test_cli_trains_with_split_lbi_options_and_rejects_bad_ones(tmp_path, capsys):
    flags = ["--model", "lenet5", "--dataset", "synthetic", "--num-train-samples", "64", "--num-test-samples", "32",
             "--batch-size", "16", "--steps", "4", "--selectivity", "none", "--analyze-samples", "32",
             "--threads", "1", "--device", "cpu", "--no-progress", "--out-dir", str(tmp_path)]
    assert cli_main(["train", "--optimizer", "slbi", "--lr", "0.1", "--slbi-nu", "20", "--slbi-kappa", "2",
                     "--reg", "none", "--name", "lbi", *flags]) == 0
    written = RunConfig.from_toml(tmp_path / "lbi" / "config.toml")
    assert (written.optimizer, written.slbi_nu, written.slbi_kappa) == ("slbi", 20.0, 2.0)
    assert (tmp_path / "lbi" / "result.json").is_file()

    assert cli_main(["train", "--optimizer", "slbi", "--slbi-nu", "0", "--name", "bad", *flags]) == 2
    assert "slbi_nu=0.0" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("changes", [dict(optimizer="slbi", reg="none"), dict(optimizer="momentum", reg="cges"),
                                     dict(optimizer="sgd", reg="group-lasso")])
def test_training_steps_do_not_synchronise_the_gpu(changes):
    from sparsekern.models import LeNet5

    model = LeNet5().cuda()
    config = RunConfig(lr=0.1, reg_strength=1e-3, steps=3, **changes)
    opt = Optimization(config, model, total_steps=3)
    x = torch.randn(8, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(2):  # the first step creates the optimizer state
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    opt.end_epoch(0)
