"""Explicit-pruning baselines: L1-norm filter plans, Network Slimming's global threshold and
penalty (sparsekern.regularize.slimming: standalone and as ``reg="slimming"`` of the training
loop), and fine-tuning (sparsekern.train.finetune)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.models import build_model
from sparsekern.prune import prune_model
from sparsekern.prune.baselines import l1_norm_plan, slimming_plan, slimming_threshold, unit_layers
from sparsekern.regularize import SlimmingPenalty
from sparsekern.train import RunConfig
from sparsekern.train.finetune import fine_tune
from sparsekern.train.optim import Optimization

UNITS = [f"features.c{i}.conv" for i in range(1, 8)]


def basicnet(seed=0):
    torch.manual_seed(seed)
    net = build_model("basicnet", in_channels=1, num_classes=10, width=0.125)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # distinct |gamma| of both signs, so rankings have no ties
            m.weight.data = (torch.rand(m.num_features, generator=g) + 0.05) * torch.sign(
                torch.randn(m.num_features, generator=g))
    return net.eval()


def test_unit_layers_are_the_conv_bn_units_not_the_classifier():
    assert unit_layers(basicnet()) == UNITS


@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0])
def test_l1_plan_keeps_exactly_the_top_l1_filters_of_each_layer(ratio):
    net = basicnet()
    plan = l1_norm_plan(net, ratio)
    assert set(plan.layers) == set(UNITS) and not plan.exact
    for name in UNITS:
        w = net.get_submodule(name).weight.detach().double()
        norms = [float(w[o].abs().sum()) for o in range(w.shape[0])]  # per filter, by hand
        k = max(1, int(round(ratio * len(norms))))
        top = sorted(range(len(norms)), key=lambda o: -norms[o])[:k]
        assert plan.layers[name].kept == sorted(top), name
        assert min(norms[o] for o in top) > max([norms[o] for o in range(len(norms)) if o not in top], default=-1)


def test_l1_plan_with_per_layer_counts():
    net = basicnet()
    counts = {"features.c2.conv": 3, "features.c7.conv": 60}
    plan = l1_norm_plan(net, counts)
    for name in UNITS:
        w = net.get_submodule(name).weight.detach().double().abs().flatten(1).sum(1)
        k = counts.get(name, w.numel())
        assert plan.layers[name].kept == sorted(torch.topk(w, k).indices.tolist())
    with pytest.raises(ValueError, match="not prunable unit layers"):
        l1_norm_plan(net, {"classifier": 5})
    with pytest.raises(ValueError, match="has 16 filters; cannot keep 17"):
        l1_norm_plan(net, {"features.c2.conv": 17})
    with pytest.raises(ValueError, match="keep_ratio"):
        l1_norm_plan(net, 0.0)


def test_l1_pruned_model_equals_original_with_removed_filters_zeroed():
    net = basicnet()
    plan = l1_norm_plan(net, 0.5)
    x = torch.randn(3, 1, 28, 28)
    pruned, _ = prune_model(net, plan, x)
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for name, layer in plan.layers.items():
            unit = masked.get_submodule(name.rsplit(".", 1)[0])
            # Zeroing the BN affine with beta = 0 makes the removed channels output exactly 0.
            unit.bn.weight[layer.removed] = 0.0
            unit.bn.bias[layer.removed] = 0.0
        ref, out = masked(x), pruned(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_slimming_threshold_reaches_the_global_keep_ratio(ratio):
    net = basicnet()
    gammas = {name: net.get_submodule(name.replace("conv", "bn")).weight.detach().double().abs() for name in UNITS}
    everything = sorted(torch.cat(list(gammas.values())).tolist(), reverse=True)
    k = int(round(ratio * len(everything)))
    assert slimming_threshold(net, ratio) == pytest.approx(everything[k - 1], abs=0)
    plan = slimming_plan(net, ratio)
    assert sum(len(layer.kept) for layer in plan.layers.values()) == k
    threshold = everything[k - 1]
    for name, layer in plan.layers.items():
        assert all(gammas[name][c] >= threshold for c in layer.kept)
        assert all(gammas[name][c] < threshold for c in layer.removed)


def test_slimming_needs_bn():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="BatchNorm"):
        slimming_plan(plain, 0.5)
    with pytest.raises(ValueError, match="BatchNorm"):
        SlimmingPenalty(plain, 1e-4)
    with pytest.raises(ValueError, match="strength"):
        SlimmingPenalty(basicnet(), 0.0)


def _grads(net, x, y, penalty=None, use="none"):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    if use == "step":
        penalty.step()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("use", ["step", "hook"])
def test_slimming_penalty_adds_lambda_sign_gamma_to_the_gamma_grads(use):
    lam = 3e-3
    net = basicnet().train()
    net.features.c3.bn.weight.data[0] = 0.0  # sign(0) = 0: no push on an exactly zero gamma
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = _grads(copy.deepcopy(net), x, y)
    # Independent reference: autograd of the loss plus lam * sum |gamma| (its derivative is sign(gamma)).
    ref_net = copy.deepcopy(net)
    ref_net.zero_grad(set_to_none=True)
    bn_weights = [m.weight for m in ref_net.modules() if isinstance(m, nn.BatchNorm2d)]
    (F.cross_entropy(ref_net(x), y) + lam * sum(w.abs().sum() for w in bn_weights)).backward()
    reference = {n: p.grad.clone() for n, p in ref_net.named_parameters()}

    penalty = SlimmingPenalty(net, lam)
    if use == "hook":
        penalty.attach()
    got = _grads(net, x, y, penalty, use)
    for name, grad in got.items():
        if name.endswith("bn.weight"):
            gamma = dict(net.named_parameters())[name].detach()
            assert torch.allclose(grad, plain[name] + lam * torch.sign(gamma), atol=1e-7), name
            assert torch.allclose(grad, reference[name], atol=1e-6), name
        else:
            assert torch.allclose(grad, plain[name], atol=1e-7), name
    assert got["features.c3.bn.weight"][0] == plain["features.c3.bn.weight"][0]
    if use == "hook":
        penalty.remove()
        again = _grads(net, x, y)
        assert torch.allclose(again["features.c1.bn.weight"], plain["features.c1.bn.weight"], atol=1e-7)


def test_training_loop_reg_slimming_is_sgd_plus_lambda_sign_gamma_without_l2():
    lam, lr = 1e-2, 0.1
    config = RunConfig(dataset="synthetic", width=0.125, optimizer="sgd", lr=lr, reg="slimming", reg_strength=lam,
                       steps=1)
    net = basicnet().train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = _grads(copy.deepcopy(net), x, y)
    optimization = Optimization(config, net, total_steps=1)
    optimization.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimization.step()
    for name, p in net.named_parameters():
        push = lam * torch.sign(before[name]) if name.endswith("bn.weight") else 0.0
        assert torch.allclose(p.detach(), before[name] - lr * (plain[name] + push), atol=1e-6), name


def test_fine_tune_equals_a_plain_training_loop():
    net = basicnet().train()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    reference = copy.deepcopy(net)
    mean_loss = fine_tune(net, batches, steps=5, lr=0.05, optimizer="sgd", momentum=0.0)
    # By hand: 5 plain SGD steps cycling over the 2 batches.
    losses = []
    for step in range(5):
        x, y = batches[step % 2]
        reference.zero_grad(set_to_none=True)
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.05 * p.grad
    assert not net.training
    assert mean_loss == pytest.approx(sum(losses) / 5, rel=1e-5)
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_fine_tune_rejects_bad_arguments():
    net = basicnet()
    batch = [(torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="steps"):
        fine_tune(net, batch, -1, 1e-3)
    with pytest.raises(ValueError, match="lr"):
        fine_tune(net, batch, 1, float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        fine_tune(net, batch, 1, 1e-3, optimizer="lbfgs")
    with pytest.raises(ValueError, match="no batches"):
        fine_tune(net, [], 1, 1e-3)
