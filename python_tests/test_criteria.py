"""Pruning criteria (sparsekern.prune.criteria) and PrunePlan.from_criterion: each criterion's
scores against a hand computation on a small model, the keep rules, exact criteria pruning
exactly (planted dead / constant channels, float64, fresh inputs), and who reads a channel
taken from the channel graph where module order says otherwise."""
import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.prune import (
    CGES, APoZ, ConstantGamma, DeadByActivation, L1Norm, PrunePlan, Selectivity, Slimming, SplitLBIOrder,
    analyze_dependencies, prune_model,
)
from sparsekern.prune.criteria import GivenScores, unit_layers

from _helpers import make_constant, randomize_bn

UNITS = ("0", "3")  # the Conv-BN-ReLU units of small_net(); "9" is the classifier, without BN


def small_net():
    """Conv-BN-ReLU -> Conv-BN-ReLU -> max pool -> conv 1x1 (no BN) -> global pool -> Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )
    return randomize_bn(net).eval()


def analysis(net, batches):
    return sparsekern.analyze(net, batches, progress=False, selectivity="none")


def post_relu(net, batches) -> dict:
    """{unit: every post-ReLU map of the corpus, (N, C, H, W) in float64}, from forward hooks."""
    maps = {name: [] for name in UNITS}
    relus = {"0": net[2], "3": net[5]}
    hooks = [relus[n].register_forward_hook(lambda m, a, out, n=n: maps[n].append(out.double()))
             for n in UNITS]
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in maps.items()}


# ---------------------------------------------------------------------- scores by hand
def test_l1_norm_and_slimming_scores_are_the_filter_norms_and_gammas():
    net = small_net()
    assert unit_layers(net) == list(UNITS)
    l1 = L1Norm().scores(net)
    assert list(l1) == list(UNITS)  # the unit layers only: not the 1x1 conv or the classifier
    for name, bn in (("0", net[1]), ("3", net[4])):
        conv = net[int(name)]
        by_hand = [sum(abs(float(w)) for w in conv.weight.detach()[o].flatten()) for o in range(conv.out_channels)]
        assert l1[name].tolist() == pytest.approx(by_hand, rel=1e-6)
        assert Slimming().scores(net)[name].tolist() == [abs(float(g)) for g in bn.weight.detach()]
        assert ConstantGamma().scores(net)[name].tolist() == [abs(float(g)) for g in bn.weight.detach()]
    assert not L1Norm.exact and not Slimming.exact and ConstantGamma.exact and DeadByActivation.exact
    assert (L1Norm.scope, Slimming.scope, CGES.scope) == ("layer", "global", "global")


def test_constant_gamma_marks_zero_gammas_with_relu_beta():
    net = small_net()
    make_constant(net[1], [1, 4], -0.5)  # relu(-0.5) = 0: dead
    make_constant(net[4], [2], 0.75)     # relu(0.75): the constant 0.75
    net[4].weight.data[5] = 2e-3          # above the threshold: not marked
    marked = ConstantGamma(1e-3).marked(net)
    assert set(marked) == set(UNITS)
    assert marked["0"].channels == 6 and marked["0"].values == {1: 0.0, 4: 0.0}
    assert marked["3"].values == {2: pytest.approx(0.75)} and not marked["3"].notes
    with pytest.raises(ValueError, match="positive finite"):
        ConstantGamma(0.0)


def test_dead_by_activation_and_apoz_scores_match_hooked_activations():
    net = small_net()
    make_constant(net[4], [0, 6], -1.0)  # dead on every input
    batches = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = analysis(net, batches)
    maps = post_relu(net, batches)
    dead = DeadByActivation(result)
    apoz = APoZ(result)
    assert DeadByActivation.needs_model is False and APoZ.needs_model is False
    for name in UNITS:
        m = maps[name]
        corpus_max = m.amax((0, 2, 3))
        positive = (m > 0).double().mean((0, 2, 3))  # fraction of positive elements: 1 - APoZ
        assert torch.equal(dead.scores()[name], corpus_max.float().double())
        assert torch.allclose(apoz.scores()[name], positive, atol=1e-12, rtol=0)
        assert dead.marked()[name].values == {c: 0.0 for c in torch.nonzero(corpus_max < 1e-12).flatten().tolist()}
    assert set(dead.marked()["3"].values) >= {0, 6}


def test_selectivity_scores_are_universality_from_hooked_activations():
    net = small_net()
    make_constant(net[4], [0, 6], -1.0)  # dead on every input: selectivity 1, scores 0
    batches = [torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batches[1][:, :, :4] *= 40.0  # some samples far stronger than others: selective channels
    result = sparsekern.analyze(net, batches, progress=False, selectivity="exact")
    maps = post_relu(net, batches)
    for threshold in (1e-3, 0.5):
        scores = Selectivity(result, threshold).scores()
        assert list(scores) == list(UNITS)
        for name in UNITS:
            per_sample = maps[name].amax((2, 3))  # m[n, c], float64
            corpus_max = per_sample.amax(0)
            below = per_sample < threshold * corpus_max
            universality = torch.where(corpus_max > 0, 1.0 - below.double().mean(0), 0.0)
            assert torch.allclose(scores[name], universality, atol=1e-12, rtol=0), (name, threshold)
    assert scores["3"][[0, 6]].tolist() == [0.0, 0.0]
    assert len(set(Selectivity(result, 0.5).scores()["0"].tolist())) > 1  # the test distinguishes channels
    plan = PrunePlan.from_criterion(Selectivity(result), net, 0.5)
    assert not plan.exact and not {0, 6} & set(plan.layers["3"].kept)
    assert Selectivity.needs_model is False and not Selectivity.exact
    with pytest.raises(ValueError, match="positive finite"):
        Selectivity(result, 0.0)
    with pytest.raises(ValueError, match="keeps no per-sample maxima"):
        Selectivity(analysis(net, batches)).scores()


def test_split_lbi_order_scores_the_first_entered_highest():
    net = small_net()

    class Order:  # stands in for a SplitLBI optimizer: a fixed ranking per weight
        orders = {id(net[0].weight): [3, 0, 5, 1, 2, 4], id(net[3].weight): [7, 6, 5, 4, 3, 2, 1, 0]}

        def unit_kind(self, weight):
            return "filter"

        def importance(self, weight):
            return torch.tensor(self.orders[id(weight)])

    scores = SplitLBIOrder(Order()).scores(net)
    for name in UNITS:
        order = Order.orders[id(net[int(name)].weight)]
        assert torch.argsort(scores[name], descending=True).tolist() == order
    plan = PrunePlan.from_criterion(SplitLBIOrder(Order()), net, 0.5)
    assert plan.layers["0"].kept == [0, 3, 5] and plan.layers["3"].kept == [4, 5, 6, 7]

    class Weights(Order):
        def unit_kind(self, weight):
            return "weight"

    with pytest.raises(ValueError, match="ranks its weights, not its filters"):
        SplitLBIOrder(Weights()).scores(net)


# ---------------------------------------------------------------------- keep rules
def test_from_criterion_keep_ratio_counts_threshold():
    net = small_net()
    given = GivenScores({"0": torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2]),
                         "3": torch.tensor([0.95, 0.6, 0.01, 0.7, 0.0, 0.0, 0.0, 0.0])})
    per_layer = PrunePlan.from_criterion(given, net, 0.5)
    assert per_layer.layers["0"].kept == [1, 2, 4] and per_layer.layers["3"].kept == [0, 1, 2, 3]
    assert not per_layer.exact and per_layer.model_class.endswith("Sequential")
    # Global: the best 7 of 14 scores are 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3.
    glob = PrunePlan.from_criterion(given, net, 0.5, scope="global")
    assert glob.layers["0"].kept == [1, 2, 3, 4] and glob.layers["3"].kept == [0, 1, 3]
    assert PrunePlan.from_criterion(given, net, 0.01, scope="global").layers["3"].kept == [0]  # at least one
    counts = PrunePlan.from_criterion(given, net, {"3": 2})
    assert counts.layers["3"].kept == [0, 3] and counts.layers["0"].kept == list(range(6))
    assert counts.source == "from_scores(per-layer counts)"
    above = PrunePlan.from_criterion(given, net, threshold=0.6)
    assert above.layers["0"].kept == [1, 4] and above.layers["3"].kept == [0, 1, 3]
    assert PrunePlan.from_criterion(given, net, threshold=5.0).layers["0"].kept == [1]  # its best stays
    # Ties keep the lower index: 0.0 at channels 4..7 of "3", one of them kept.
    assert PrunePlan.from_criterion(given, net, 5 / 8).layers["3"].kept == [0, 1, 2, 3, 4]


def test_from_criterion_errors():
    net = small_net()
    with pytest.raises(ValueError, match="is a ranking"):
        PrunePlan.from_criterion(L1Norm(), net)
    with pytest.raises(ValueError, match="not both"):
        PrunePlan.from_criterion(L1Norm(), net, 0.5, threshold=1.0)
    with pytest.raises(ValueError, match="model=None"):
        PrunePlan.from_criterion(L1Norm(), None, 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        PrunePlan.from_criterion(L1Norm(), net, 1.5)
    with pytest.raises(ValueError, match="scope"):
        PrunePlan.from_criterion(L1Norm(), net, 0.5, scope="net")
    with pytest.raises(ValueError, match="per-layer counts"):
        PrunePlan.from_criterion(L1Norm(), net, {"0": 2}, scope="global")
    with pytest.raises(ValueError, match="not prunable unit layers"):
        PrunePlan.from_criterion(L1Norm(), net, {"9": 2})
    with pytest.raises(ValueError, match="has 6 filters; cannot keep 7"):
        PrunePlan.from_criterion(L1Norm(), net, {"0": 7})
    with pytest.raises(ValueError, match="NaN"):
        PrunePlan.from_criterion(GivenScores({"0": torch.full((6,), float("nan"))}), net, 0.5)
    with pytest.raises(ValueError, match="has 6 output channels, but 2"):
        PrunePlan.from_criterion(GivenScores({"0": torch.ones(2)}), net, 0.5)


# ---------------------------------------------------------------------- exact criteria prune exactly
def assert_exact_on_fresh_inputs(net, plan, verify_batch):
    net64 = copy.deepcopy(net).double()
    pruned, _ = prune_model(net64, plan, verify_batch.double())
    fresh = 3 * torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want, got = net64(fresh), pruned(fresh)
    assert (got - want).abs().max() <= 1e-12 * float(want.abs().max())
    return pruned


def test_exact_criteria_remove_planted_channels_exactly():
    net = small_net()
    make_constant(net[1], [2], -1.0)       # dead
    make_constant(net[4], [1, 5], 0.4)     # constant 0.4 into the unpadded 1x1 conv: folded
    make_constant(net[4], [3], -2.0)       # dead
    batches = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    gamma = PrunePlan.from_criterion(ConstantGamma(), net)
    assert gamma.exact and gamma.source == "constant_gamma(threshold=0.001)"
    assert {n: gamma.layers[n].removed for n in UNITS} == {"0": [2], "3": [1, 3, 5]}
    pruned = assert_exact_on_fresh_inputs(net, gamma, batches[0])
    assert pruned[0].out_channels == 5 and pruned[3].out_channels == 5 and pruned[7].in_channels == 5

    dead = PrunePlan.from_criterion(DeadByActivation(analysis(net, batches)), None)
    assert dead.exact and dead.model_class is None
    # Only the planted channels are dead on the corpus (so the plan must hold on fresh inputs too);
    # the constant-0.4 channels 1 and 5 are not dead.
    assert {n: dead.layers[n].removed for n in UNITS} == {"0": [2], "3": [3]}
    assert_exact_on_fresh_inputs(net, PrunePlan(layers={n: dead.layers[n] for n in UNITS}), batches[0])


def test_old_entry_points_equal_the_criteria():
    net = small_net()
    make_constant(net[4], [2], 0.3)
    assert PrunePlan.from_gamma(net).layers == PrunePlan.from_criterion(ConstantGamma(), net).layers
    batches = [torch.randn(4, 1, 8, 8)]
    result = analysis(net, batches)
    assert PrunePlan.from_analysis(result).layers == PrunePlan.from_criterion(DeadByActivation(result), None).layers


# ---------------------------------------------------------------------- who reads a channel
class OrderLies(nn.Module):
    """Module order lies: ``b`` is defined before ``a`` but reads it, and ``fc`` (next after
    ``a`` in module order) reads ``b``, flattened after a 2x2 pool."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_max_pool2d(x, 2), 1))


def test_cges_asks_the_channel_graph_who_reads_a_channel():
    """Module order says: a's next layer is fc, b's is a. The graph says: b reads a, fc reads b
    (four positions per channel after the 2x2 pool and flatten). A channel is unread when all
    its readers' weights there are 0."""
    torch.manual_seed(0)
    model = randomize_bn(OrderLies()).eval()
    with torch.no_grad():
        model.b.weight[:, 5] = 0        # nothing reads a's channel 5
        model.fc.weight[:, 12:16] = 0   # nothing reads b's channel 3 (fc inputs 12..15)
        model.fc.weight[:, 8] = 0       # one of b's channel 2's four positions only: still read
        model.a.weight[1] = 0           # a's filter 1 itself is zero
    graph = analyze_dependencies(model, torch.randn(1, 1, 8, 8))
    readers = graph.readers("b")
    assert [(info.module_name, pos) for info, pos in readers[3]] == [("fc", [12, 13, 14, 15])]
    assert [(info.module_name, pos) for info, pos in graph.readers("a")[5]] == [("b", [5])]

    scores = CGES((1, 1, 8, 8)).scores(model)
    gamma = {"a": model.bn_a.weight.detach().abs().double(), "b": model.bn_b.weight.detach().abs().double()}
    offset = 1.0 + max(float(g.max()) for g in gamma.values())
    zero = {"a": {1, 5}, "b": {3}}
    for name in ("a", "b"):
        expected = [float(gamma[name][c]) - (offset if c in zero[name] else 0.0) for c in range(8)]
        assert scores[name].tolist() == pytest.approx(expected, abs=0), name
    plan = PrunePlan.from_criterion(CGES((1, 1, 8, 8)), model, 13 / 16)  # exactly the three unread / zero go
    assert {n: plan.layers[n].removed for n in ("a", "b")} == {"a": [1, 5], "b": [3]}


def test_readers_needs_shapes_and_sees_the_model_output():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="example_inputs"):
        sparsekern.prune.ChannelGraph(net).readers("0")
    readers = analyze_dependencies(net, torch.randn(1, 1, 4, 4)).readers("0")
    assert [[(info.kind, pos) for info, pos in r] for r in readers] == [[("output", [c])] for c in range(3)]
