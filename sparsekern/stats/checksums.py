"""Batch checksums: one int64 per batch of per-sample maxima, kept on the device, that says
whether two passes fed the same maxima batch by batch (analyze's two-pass check)."""
from __future__ import annotations

import torch

from sparsekern.ops.channel_stats_update import host_checksum

CHECKSUM_BLOCK = 1024  # checksums are stacked into one tensor per this many batches


def checksum(m: torch.Tensor) -> torch.Tensor:
    """0-dim int64 checksum of a batch of maxima m (N, C float32): the sum of their bit patterns.

    Stays on the device (no host sync). Integer addition is associative, so the sum does not
    depend on the order in which a reduction kernel adds (a float sum on a GPU may differ
    bitwise between two runs); the maxima themselves are order-independent too (a max, even one
    merged with atomics), so the same activations always give the same checksum. Zero and NaN
    are mapped to one pattern each first: a max may return -0.0, or any NaN payload. At most
    N C 2^31 in magnitude: no overflow below 2^32 maxima per batch.
    """
    bits = torch.where(torch.isnan(m), -1, m.view(torch.int32))
    return torch.where(m == 0, 0, bits).sum(dtype=torch.int64)


class BatchChecksums:
    """The checksums of every batch recorded, in order. CPU maxima are summed by the extension in
    one pass (``host_checksum``): the five torch ops of ``checksum`` cost ~0.35 ms per batch on
    MobileNetV2's 64 x 1280 maxima, a fifth of analyze's per-feature overhead."""

    def __init__(self):
        self._blocks: list[torch.Tensor] = []  # stacked checksums, CHECKSUM_BLOCK each
        self._recent: list[torch.Tensor] = []  # 0-dim checksums not stacked yet

    def record(self, m: torch.Tensor) -> None:
        value = host_checksum(m)
        self._recent.append(checksum(m) if value is None else torch.tensor(value, dtype=torch.int64))
        # Stacked now and then, so a long pass holds a few tensors rather than one per batch.
        if len(self._recent) == CHECKSUM_BLOCK:
            self._blocks.append(torch.stack(self._recent))
            self._recent = []

    def all(self, device: torch.device) -> torch.Tensor:
        """(batches,) int64; an empty tensor on ``device`` before any batch."""
        blocks = self._blocks + ([torch.stack(self._recent)] if self._recent else [])
        if not blocks:
            return torch.zeros(0, dtype=torch.int64, device=device)
        return torch.cat(blocks)
