"""ChannelStats.all_reduce over two gloo processes on the CPU equals one process over all data."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsekern.stats.channel_stats import ChannelStats
from test_channel_stats import assert_same_statistics, make_activations, ref_corpus_max, ref_maxima

WORLD = 2
SPLIT = 9  # rank 0 gets samples [0, 9), rank 1 the other 22: shards of different sizes
MODES = ["exact", "memmap", "histogram", "none", "two_pass"]
THRESHOLDS = (1e-3, 0.3)


def corpus() -> torch.Tensor:
    x = make_activations(n=31, seed=21)
    x[20, 6, 1, 1] = float("nan")  # in rank 1's shard: NaN counts must travel too
    return x


def build(mode: str, path, x: torch.Tensor, **kwargs) -> ChannelStats:
    base = "none" if mode == "two_pass" else mode
    stats = ChannelStats(selectivity=base, memmap_path=path if mode == "memmap" else None, **kwargs)
    if mode == "two_pass":
        stats.set_reference_max(ref_corpus_max(ref_maxima(corpus())).float(), thresholds=THRESHOLDS)
    for block in x.split(5):
        stats.update(block)
    return stats


def worker(rank: int, init_file: str, tmp_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = corpus()
        shard = x[:SPLIT] if rank == 0 else x[SPLIT:]
        for mode in MODES:
            path = os.path.join(tmp_dir, f"{mode}-rank{rank}.f32")
            reduced = build(mode, path, shard)
            reduced.all_reduce()
            whole = build(mode, os.path.join(tmp_dir, f"{mode}-whole-rank{rank}.f32"), x)
            assert_same_statistics(reduced, whole, thresholds=THRESHOLDS)
            if mode == "exact":  # gathered in rank order: the rows are the whole corpus's
                gathered = reduced._store.maxima
                torch.testing.assert_close(gathered, ref_maxima(x).float(), rtol=0, atol=0, equal_nan=True)
            if mode == "memmap":  # every rank's file now holds all 31 rows
                rows = np.fromfile(path, dtype=np.float32).reshape(-1, x.shape[1])
                assert rows.shape[0] == x.shape[0]

        # A rank that saw no data takes part when it knows the channel count.
        idle = build("exact", None, x if rank == 0 else x[:0], num_channels=x.shape[1])
        idle.all_reduce()
        assert_same_statistics(idle, build("exact", None, x), thresholds=THRESHOLDS)

        # Ranks that disagree on the mode fail together, with the reason, and stay in step.
        mismatched = build("exact" if rank == 0 else "histogram", None, shard)
        with pytest.raises(ValueError, match="ranks disagree"):
            mismatched.all_reduce()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_all_reduce_equals_single_process(tmp_path):
    context = mp.start_processes(
        worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    for _ in range(120):  # seconds; a hung collective must fail the test, not the CI job
        if context.join(timeout=1):
            return
    for process in context.processes:
        process.kill()
    pytest.fail("the distributed workers did not finish within 120 s")
