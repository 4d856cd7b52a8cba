"""Selectivity stores: what each ``ChannelStats`` selectivity mode keeps of the per-sample
maxima, behind one interface (``SelectivityStore``), plus the two-pass counter.

Selectivity needs the corpus max before a sample can be classified, so a one-pass method must
either keep every per-sample maximum or approximate. The modes (``selectivity=...``):

* ``"exact"`` (``ExactStore``): keeps every m[n, c] (float32) on the device. Exact.
* ``"memmap"`` (``MemmapStore``): the same maxima in a raw float32 (N, C) file on the host,
  staged through pinned buffers and read back in chunks. Exact.
* ``"histogram"`` (``HistogramStore``): bounded memory, one pass, approximate with a reported
  bound (log-spaced buckets from the float32 bits; only the bucket straddling the threshold is
  uncertain).
* ``"none"`` (the base ``SelectivityStore``): no per-sample storage (corpus max, dead mask,
  APoZ only).
* two-pass, exact with bounded memory, alongside any mode (``TwoPassCounter``): counts, per
  threshold, the samples below it against the corpus max of a first pass.

Memory for an ImageNet-sized corpus, N = 1.28M samples, ResNet-50 (26,560 post-BN channels in
53 BN layers; the largest layer has C = 2048):

==============  ==========================  ==============  ==================================
mode            bytes                       C = 2048 layer  all of ResNet-50
==============  ==========================  ==============  ==================================
exact           N x C x 4 (device)          10.5 GB         136 GB
memmap          N x C x 4 (disk) + 4 MiB    10.5 GB disk    136 GB disk + 212 MiB pinned host
                pinned host per layer
histogram b=3   C x 2042 x 8                33 MB           434 MB   (b = 1: 109 MB, b = 0: 55 MB)
two-pass        C x (8 T + 8), T thresholds 33 KB (T = 1)   425 KB (T = 1)
none            about C x 29                59 KB           0.8 MB
==============  ==========================  ==============  ==================================

Every mode also keeps the ~29 bytes per channel of "none" (max, NaN / Inf / positive counts),
which ``ChannelStats`` holds itself.
"""
from __future__ import annotations

from sparsekern.stats.stores.base import Collective, SelectivityStore
from sparsekern.stats.stores.exact import ExactStore
from sparsekern.stats.stores.histogram import MAX_MANTISSA_BITS, HistogramStore
from sparsekern.stats.stores.memmap import MemmapStore
from sparsekern.stats.stores.two_pass import TwoPassCounter, same_reference

MODES = ("exact", "memmap", "histogram", "none")

__all__ = ["MODES", "MAX_MANTISSA_BITS", "Collective", "SelectivityStore", "ExactStore", "MemmapStore",
           "HistogramStore", "TwoPassCounter", "make_store", "same_reference"]


def make_store(mode: str, *, memmap_path: str | None, histogram_mantissa_bits: int) -> SelectivityStore:
    """The (not yet started) store of selectivity mode ``mode``, one of MODES."""
    if mode == "exact":
        return ExactStore()
    if mode == "memmap":
        return MemmapStore(memmap_path)
    if mode == "histogram":
        return HistogramStore(histogram_mantissa_bits)
    if mode == "none":
        return SelectivityStore()
    raise ValueError(f"unknown selectivity mode {mode!r}; expected one of {MODES}")
