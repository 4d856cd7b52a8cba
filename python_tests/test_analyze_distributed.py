"""Distributed analyze: 2 CPU processes (gloo), each analysing its DistributedSampler shard,
must return exactly what one process returns for the whole corpus.

The worker processes run this file as a script (``python test_analyze_distributed.py rank
world init_file out_file``), so nothing depends on how pytest imports test modules.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from _helpers import run_ranks

WORLD = 2
MODES = ("two-pass", "exact")


def build_case():
    """The same model and corpus in every process (50 samples: 25 per rank)."""
    from sparsekern.models import build_model

    torch.manual_seed(0)
    model = build_model("basicnet", in_channels=1, num_classes=10, width=0.25)
    with torch.no_grad():  # a few dead channels
        model.features.c4.bn.weight[:3] = 0
        model.features.c4.bn.bias[:3] = -1
    x = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, TensorDataset(x, torch.zeros(50, dtype=torch.int64))


def run_analysis(loader) -> dict:
    """What the test compares, per selectivity mode: per-layer numbers as CPU tensors."""
    from sparsekern.stats.analyze import analyze

    model, _ = build_case()
    out = {}
    for mode in MODES:
        result = analyze(model, loader, selectivity=mode, progress=False)
        out[mode] = {
            "num_images": result.num_images,
            "report": result.report.to_dict(),
            "layers": {
                name: {
                    "num_samples": s.num_samples,
                    "corpus_max": s.corpus_max.cpu(),
                    "dead": s.dead_mask().cpu(),
                    "selectivity": s.selectivity(1e-3).value.cpu(),
                    "apoz": s.apoz().cpu(),
                }
                for name, s in result.stats.items()
            },
        }
    return out


def shard_loader(dataset, rank: int) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=8, sampler=sampler)  # 25 samples: batches 8, 8, 8, 1


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, dataset = build_case()
        torch.save(run_analysis(shard_loader(dataset, rank)), out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_analysis_equals_one_process(tmp_path):
    outs = run_ranks(__file__, WORLD, tmp_path, ".pt")

    # One process over the same batches the ranks saw, on one thread as they ran: a CPU conv may
    # round a batch of 1 differently from a batch of 8, and with 2 threads differently from 1
    # (oneDNN on AVX-512 does), and this test is about merging, not about batching or threading.
    _, dataset = build_case()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = run_analysis([batch for r in range(WORLD) for batch in shard_loader(dataset, r)])
    finally:
        torch.set_num_threads(threads)
    for r in range(WORLD):
        got = torch.load(outs[r])
        for mode in MODES:
            assert got[mode]["num_images"] == expected[mode]["num_images"] == 50
            assert got[mode]["report"]["layers"] == expected[mode]["report"]["layers"], (r, mode)
            for name, numbers in expected[mode]["layers"].items():
                assert numbers["num_samples"] == got[mode]["layers"][name]["num_samples"] == 50
                for key in ("corpus_max", "dead", "selectivity", "apoz"):
                    assert torch.equal(got[mode]["layers"][name][key], numbers[key]), (r, mode, name, key)
    assert sum(expected["exact"]["layers"]["features.c4"]["dead"].tolist()) >= 3


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
