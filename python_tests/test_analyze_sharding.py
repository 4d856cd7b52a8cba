"""Distributed analyze over padded, dropped and uneven shards (sparsekern.stats.sharding).

2, 3 and 4 gloo ranks analyse odd corpora (53, 7, 3 samples) through DistributedSampler (shuffled
or not, padding or drop_last), DataLoader(drop_last=True), a BatchSampler and an uneven custom
sampler that gives one rank nothing. Each rank records, by a forward pre-hook, the inputs the
model actually ran on. The test then checks

* num_images-level facts against the samplers themselves: every sample the ranks' loaders yield
  is measured exactly once (padding copies never), the dropped ones not at all, num_images and
  dropped_images count them, and a warning says how many were dropped;
* the statistics against one process analysing the same samples in the same batches: corpus
  max, dead masks, two-pass selectivity, APoZ, histograms and num_samples, bit for bit.

The worker processes run this file as a script (``python test_analyze_sharding.py rank world
init_file out_file``).
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from _helpers import run_ranks

MODES = ("two-pass", "histogram")


class ListSampler(Sampler):
    """A fixed list of indices: the uneven custom shard of one rank."""

    def __init__(self, indices):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def dataset_of(n: int) -> TensorDataset:
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(n))
    return TensorDataset(x, torch.arange(n))


def fast_dataset(n: int):
    """The same corpus size as an InMemoryImageDataset: make_loader gives it sparsekern's own
    TensorBatchLoader, which pads its shards as DistributedSampler does (labels = indices)."""
    from sparsekern.data import InMemoryImageDataset

    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    return InMemoryImageDataset(images, torch.arange(n), mean=0.5, std=0.25, num_classes=n)


def fast_loader(d, r, w):
    from sparsekern.data import TensorBatchLoader

    return TensorBatchLoader(fast_dataset(len(d)), 8, rank=r, world_size=w)


def inputs_of(case: str) -> torch.Tensor:
    """The model input of every corpus sample, by index."""
    n = CASES[case][1]
    if CASES[case][2] is fast_loader:
        return fast_dataset(n).get_batch(torch.arange(n))[0]
    return dataset_of(n).tensors[0]


def make_model():
    from sparsekern.models import build_model

    torch.manual_seed(0)
    model = build_model("basicnet", in_channels=1, num_classes=10, width=0.125)
    with torch.no_grad():  # a few dead channels
        model.features.c3.bn.weight[:2] = 0
        model.features.c3.bn.bias[:2] = -1
    return model.eval()


def uneven(rank, world, n):
    """Rank 0 gets the first 30 samples, rank 1 the rest, every other rank none."""
    return ListSampler(range(30) if rank == 0 else range(30, n) if rank == 1 else [])


# case name -> (world, corpus size, loader of (dataset, rank, world))
CASES = {
    "ds-53": (3, 53, lambda d, r, w: DataLoader(d, batch_size=8, sampler=DistributedSampler(d, w, r, shuffle=False))),
    "ds-shuffle-53": (3, 53, lambda d, r, w: DataLoader(d, batch_size=8,
                                                        sampler=DistributedSampler(d, w, r, shuffle=True, seed=5))),
    "ds-drop-53": (3, 53, lambda d, r, w: DataLoader(
        d, batch_size=8, sampler=DistributedSampler(d, w, r, shuffle=True, drop_last=True))),
    "loader-drop-53": (3, 53, lambda d, r, w: DataLoader(
        d, batch_size=4, drop_last=True, sampler=DistributedSampler(d, w, r, shuffle=False))),
    "batch-sampler-53": (3, 53, lambda d, r, w: DataLoader(
        d, batch_sampler=BatchSampler(DistributedSampler(d, w, r, shuffle=True, seed=1), 7, drop_last=False))),
    "uneven-53": (3, 53, lambda d, r, w: DataLoader(d, batch_size=8, sampler=uneven(r, w, len(d)))),
    "fast-53": (3, 53, fast_loader),
    "fast-7": (4, 7, fast_loader),
    "ds-7": (4, 7, lambda d, r, w: DataLoader(d, batch_size=2, sampler=DistributedSampler(d, w, r, shuffle=False))),
    "ds-3": (4, 3, lambda d, r, w: DataLoader(d, batch_size=2, sampler=DistributedSampler(d, w, r, shuffle=False))),
    "ds-shuffle-7": (2, 7, lambda d, r, w: DataLoader(d, batch_size=3,
                                                      sampler=DistributedSampler(d, w, r, shuffle=True, seed=2))),
}


def measure(loader, mode: str) -> dict:
    """analyze's numbers as CPU tensors, the inputs the model ran on in pass 1, the warnings."""
    from sparsekern.stats.analyze import analyze

    model = make_model()
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze(model, loader, selectivity=mode, progress=False)
    layers = {}
    for name, s in result.stats.items():
        layers[name] = {"num_samples": s.num_samples, "corpus_max": s.corpus_max.cpu(), "dead": s.dead_mask().cpu(),
                        "selectivity": s.selectivity(1e-3).value.cpu(), "apoz": s.apoz().cpu()}
        if mode == "histogram":
            layers[name]["histogram"] = s.state_dict()["histogram"].cpu()
    per_pass = len(inputs) // result.passes
    return {"num_images": result.num_images, "dropped": result.dropped_images, "layers": layers,
            "report": result.report.to_dict()["layers"], "inputs": inputs[:per_pass],
            "warnings": [str(w.message) for w in caught if "dropped" in str(w.message)]}


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for case, (case_world, n, loader_of) in CASES.items():
            if case_world == world:
                loader = loader_of(dataset_of(n), rank, world)
                out[case] = {mode: measure(loader, mode) for mode in MODES}
        torch.save(out, out_file)
    finally:
        dist.destroy_process_group()


def _yielded(case: str, world: int):
    """Per rank, the dataset indices its loader yields (padding copies included)."""
    _, n, loader_of = CASES[case]
    return [[int(i) for _, idx in loader_of(dataset_of(n), r, world) for i in idx] for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_measure_each_sample_once_and_equal_one_process(tmp_path, world):
    outs = [torch.load(path) for path in run_ranks(__file__, world, tmp_path, ".pt")]
    cases = [case for case, (w, _, _) in CASES.items() if w == world]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: a CPU conv may round differently on more threads
    try:
        for case in cases:
            n = CASES[case][1]
            x = inputs_of(case)
            index_of = {x[i].numpy().tobytes(): i for i in range(n)}
            yielded = _yielded(case, world)
            expected = sorted(set(i for shard in yielded for i in shard))
            for mode in MODES:
                got = [out[case][mode] for out in outs]
                batches = [b for g in got for b in g["inputs"]]
                measured = sorted(index_of[row.numpy().tobytes()] for b in batches for row in b)
                assert measured == expected, (case, mode)  # every yielded sample once, no copy
                for g in got:
                    assert g["num_images"] == len(expected), (case, mode)
                    assert g["dropped"] == n - len(expected), (case, mode)
                    assert len(g["warnings"]) == (n > len(expected)), (case, mode, g["warnings"])
                    if n > len(expected):
                        assert f"{n - len(expected)} sample(s)" in g["warnings"][0]
                reference = measure(batches, mode)
                assert reference["num_images"] == len(expected)
                for r, g in enumerate(got):
                    assert g["report"] == reference["report"], (case, mode, r)
                    for name, numbers in reference["layers"].items():
                        for key, value in numbers.items():
                            mine = g["layers"][name][key]
                            same = torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value
                            assert same, (case, mode, r, name, key)
    finally:
        torch.set_num_threads(threads)
    if world == 3:
        dead = outs[0]["ds-53"]["two-pass"]["layers"]["features.c3"]["dead"]
        assert dead[:2].all()


def test_padding_counts_follow_the_sampler_layout():
    """Shard.real is the number of this rank's positions below len(dataset) (no process group)."""
    from sparsekern.stats.sharding import Shard

    for n, world in [(53, 3), (7, 4), (3, 4), (7, 2), (8, 4), (1, 3)]:
        d = dataset_of(n)
        for shuffle in (False, True):
            reals = [Shard(DataLoader(d, sampler=DistributedSampler(d, world, r, shuffle=shuffle))).real
                     for r in range(world)]
            assert sum(reals) == n, (n, world)
            yielded = [list(DistributedSampler(d, world, r, shuffle=shuffle)) for r in range(world)]
            kept = [i for r in range(world) for i in yielded[r][:reals[r]]]
            assert sorted(kept) == list(range(n)), (n, world, shuffle)


def test_reordering_batch_sampler_over_a_padded_shard_is_refused():
    from sparsekern.stats.sharding import Shard

    class Reversed(BatchSampler):
        def __iter__(self):
            return reversed(list(super().__iter__()))

    d = dataset_of(7)
    with pytest.raises(ValueError, match="may reorder"):
        Shard(DataLoader(d, batch_sampler=Reversed(DistributedSampler(d, 4, 3, shuffle=False), 2, False)))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
