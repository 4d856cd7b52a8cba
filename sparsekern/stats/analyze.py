"""analyze: the sparsity of a trained model over a whole corpus, in one call.

    result = sparsekern.analyze(model, loader)     # loader yields (x, y) or bare x batches
    print(result)                                  # per-layer table + throughput
    result.stats["features.c3"].dead_mask()        # the ChannelStats of every feature

The model runs in eval mode (BN with its running statistics) under ``torch.no_grad``; the
train/eval mode of every submodule is restored afterwards. Features are found as for
``SparsityTracker`` (any torchvision CNN: ResNet, VGG-BN, MobileNetV2 with ReLU6, DenseNet;
or a user model).

Selectivity (fraction of samples with m[n, c] / max_n m[n, c] < t) needs the corpus max first:

* ``"two-pass"`` (default): pass 1 finds the corpus max, pass 2 counts exactly against it.
  Exact with a few bytes per channel; the loader must yield the same batches in the same order
  both times (no random augmentation, no shuffling). This is checked batch by batch: both passes
  record every batch's size and, per layer, a checksum of its per-sample maxima (8 bytes per
  layer and batch, kept on the device; ``ChannelStats.batch_checksums``). They are compared
  after pass 2, once, rather than per batch, which would cost a host sync per batch; a
  difference raises CorpusChangedError naming the first batch that differs.
* ``"exact"``: one pass, keeps every per-sample maximum (N x C floats per layer).
* ``"histogram"``: one pass, bounded memory, approximate with a reported error bound.
* ``"memmap"``: one pass, exact, per-sample maxima in temporary files. ``"none"``: no selectivity.

Each ReLU / ReLU6 / Hardtanh module's clamp runs in the measuring kernel (``SparsityTracker``'s
``fuse_activations``: CPU float32, the same output bits as the module), so measuring adds no read of
those activations; other activations are measured by forward hooks.

Distributed: when torch.distributed is initialised, each rank analyses the shard its loader
yields (give it a DistributedSampler) and the statistics are all-reduced after every pass, so
every rank returns the statistics of the whole corpus: exactly those of one process analysing
the same samples. The copies a DistributedSampler pads a shard with are not measured (each
sample counts once), samples that drop_last leaves out are counted and warned about, a rank
whose shard is empty still joins every collective, and any other sampler is trusted to give
the ranks disjoint shards (``sparsekern.stats.sharding``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from sparsekern.errors import CorpusChangedError
from sparsekern.stats.channel_stats import ChannelStats
from sparsekern.stats.features import Feature, unwrap_model
from sparsekern.stats.report_table import SparsityReport, build_report
from sparsekern.stats.sharding import Shard, align_channels, totals
from sparsekern.stats.stores import MODES
from sparsekern.stats.tracker import SparsityTracker

SELECTIVITY_MODES = ("two-pass",) + MODES
_AMP_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class AnalysisResult:
    """What ``analyze`` measured: one ChannelStats per feature, the report, and the throughput.

    ``num_images`` is the number of corpus samples measured (all ranks, each sample once: the
    copies a DistributedSampler pads a shard with are not measured); ``dropped_images`` those
    that drop_last left out (``sparsekern.stats.sharding``); ``images_per_second`` counts every
    image of every pass on every rank over the wall-clock time of the whole analysis.
    """

    features: list[Feature]
    stats: dict[str, ChannelStats]
    report: SparsityReport
    selectivity: str
    passes: int
    num_images: int
    seconds: float
    images_per_second: float
    dropped_images: int = 0

    def to_dict(self) -> dict:
        """The report's numbers plus how the analysis ran (JSON-able)."""
        return {
            "selectivity": self.selectivity,
            "passes": self.passes,
            "num_images": self.num_images,
            "dropped_images": self.dropped_images,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "report": self.report.to_dict(),
        }

    def __str__(self) -> str:
        return (
            f"{self.report}\n{self.num_images} images, {self.passes} pass(es), selectivity={self.selectivity}: "
            f"{self.seconds:.2f} s, {self.images_per_second:.1f} images/s"
        )


def analyze(
    model: nn.Module,
    loader,
    *,
    device=None,
    selectivity: str = "two-pass",
    progress: bool = True,
    max_batches: int | None = None,
    amp_dtype: torch.dtype | None = None,
    features=None,
    backend: str = "auto",
    activation_thresholds=(1e-12, 1e-4),
    gamma_thresholds=(1e-3, 1e-2),
    selectivity_threshold: float = 1e-3,
    constant_thresholds=(1e-6,),
    leaf_modules=(),
) -> AnalysisResult:
    """Measure every post-activation feature of ``model`` over the batches of ``loader``.

    ``device``: where the inputs go (default: the model's device; the model is never moved).
    ``selectivity``: "two-pass" | "exact" | "histogram" | "memmap" | "none" (module docstring).
    ``max_batches``: stop each pass after this many batches. ``amp_dtype``: run the forward
    under ``torch.autocast`` with float16 / bfloat16. ``features``: as for SparsityTracker.
    The thresholds are those of the report (``SparsityTracker.report``). ``leaf_modules``: as for
    ``SparsityTracker`` (modules torch.fx must not trace into).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze: expected an nn.Module, got {type(model).__name__}")
    if selectivity not in SELECTIVITY_MODES:
        raise ValueError(f"analyze: unknown selectivity {selectivity!r}; expected one of {SELECTIVITY_MODES}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"analyze: max_batches must be a positive int or None, got {max_batches!r}")
    if amp_dtype is not None and amp_dtype not in _AMP_DTYPES:
        raise ValueError(f"analyze: amp_dtype must be torch.float16, torch.bfloat16 or None, got {amp_dtype!r}")
    network = unwrap_model(model)
    device = _resolve_device(network, device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    show = progress and (not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0)
    run = _PassRunner(model, loader, device, max_batches, amp_dtype, show, distributed)

    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if selectivity == "two-pass":
                with SparsityTracker(network, selectivity="none", features=features, backend=backend,
                                     checksums=True, leaf_modules=leaf_modules, fuse_activations=True) as first:
                    run("pass 1/2 (corpus max)")
                _all_reduce(first, distributed)
                references = {name: _reference(s) for name, s in first.stats.items()}
                with SparsityTracker(network, selectivity="none", features=first.features, backend=backend,
                                     checksums=True, fuse_activations=True) as tracker:
                    for name, s in tracker.stats.items():
                        s.set_reference_max(references[name], thresholds=(selectivity_threshold,))
                    run("pass 2/2 (selectivity)")
                _all_reduce(tracker, distributed)
                _agree(_corpus_change(run.batch_sizes, first, tracker), distributed, device)
            else:
                with SparsityTracker(network, selectivity=selectivity, features=features, backend=backend,
                                     leaf_modules=leaf_modules, fuse_activations=True) as tracker:
                    run("analyze")
                _all_reduce(tracker, distributed)
    finally:
        for module, training in modes:
            module.training = training
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    # Pass 1's samples over all ranks (every pass saw these: checked for two-pass), and the dropped ones.
    images, dropped = totals(run.shard, run.complete, distributed, device)
    report = build_report(
        network, tracker.features, tracker.stats,
        activation_thresholds=activation_thresholds, gamma_thresholds=gamma_thresholds,
        selectivity_threshold=None if selectivity == "none" else selectivity_threshold,
        constant_thresholds=constant_thresholds,
    )
    return AnalysisResult(
        features=tracker.features, stats=tracker.stats, report=report, selectivity=selectivity,
        passes=run.passes, num_images=images, seconds=seconds, dropped_images=dropped,
        images_per_second=images * run.passes / seconds if seconds > 0 else float("inf"),
    )


class _PassRunner:
    """Runs the model over the loader once per call (one pass), recording every batch's size."""

    def __init__(self, model, loader, device, max_batches, amp_dtype, show, distributed=False):
        self.model, self.loader, self.device = model, loader, device
        self.max_batches, self.amp_dtype, self.show = max_batches, amp_dtype, show
        self.batch_sizes: list[list[int]] = []  # per pass, per measured (non-empty) batch
        # Which samples of each batch count (DistributedSampler padding: sharding.py); a rank may
        # measure none when distributed (its stats are aligned with the others' before reducing).
        self.shard, self.distributed, self.complete = Shard(loader), distributed, True

    @property
    def passes(self) -> int:
        return len(self.batch_sizes)

    def __call__(self, description: str) -> None:
        sizes, batches = [], 0
        self.shard.start_pass()
        with tqdm(total=_total_images(self.loader, self.max_batches), desc=description, unit="img",
                  unit_scale=True, disable=not self.show, dynamic_ncols=True) as bar:
            for batch in self.loader:
                batches += 1
                x = self.shard.keep(_inputs_of(batch))
                if x.shape[0] == 0:  # only copies of samples measured elsewhere
                    if batches == self.max_batches:
                        break
                    continue
                x = x.to(self.device, non_blocking=True)
                if self.amp_dtype is None:
                    self.model(x)
                else:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype):
                        self.model(x)
                sizes.append(x.shape[0])
                bar.update(x.shape[0])
                if batches == self.max_batches:
                    break
        if not self.batch_sizes:  # whether pass 1 ran to the loader's end (else nothing counts as dropped)
            self.complete = batches != self.max_batches
        if not sizes and not self.distributed:
            again = " on its second pass (two-pass needs a re-iterable loader, not a generator)" if self.passes else ""
            raise ValueError(f"analyze: the loader yielded no batches{again}")
        self.batch_sizes.append(sizes)


def _inputs_of(batch) -> torch.Tensor:
    """The input tensor of a batch: a bare tensor, or the first item of an (x, y, ...) tuple."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            "analyze: the loader must yield tensors or (inputs, targets, ...) tuples whose first item is a "
            f"tensor; got {type(batch).__name__}" + (f" whose first item is a {type(x).__name__}" if x is not batch else "")
        )
    if not x.is_floating_point():
        raise TypeError(f"analyze: inputs must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"analyze: inputs must be batched, shape (N, ...), got shape {tuple(x.shape)}")
    return x


def _total_images(loader, max_batches):
    """Images one pass will see, when the loader can tell (only used by the progress bar)."""
    try:
        total = len(loader.sampler)
    except (AttributeError, TypeError):
        return None
    batch_size = getattr(loader, "batch_size", None)
    if max_batches is not None and batch_size:
        total = min(total, max_batches * batch_size)
    return total


def _resolve_device(network: nn.Module, device) -> torch.device:
    tensors = list(network.parameters()) or list(network.buffers())
    model_device = tensors[0].device if tensors else None
    if device is None:
        return model_device or torch.device("cpu")
    device = torch.device(device)
    if model_device is not None and (
        model_device.type != device.type or (device.index is not None and model_device.index != device.index)
    ):
        raise ValueError(f"analyze: the model is on {model_device} but device={device}; move the model first")
    return device


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(tracker: SparsityTracker, distributed: bool) -> None:
    align_channels(tracker.stats, distributed)
    if distributed:
        for s in tracker.stats.values():
            s.all_reduce()


def _reference(stats: ChannelStats) -> torch.Tensor:
    """The pass-1 corpus max as a two-pass reference. A channel that saw Inf gets 0: its
    selectivity is undefined (reported as NaN) and set_reference_max only takes finite values."""
    ref = stats.corpus_max
    return torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))


_SAME_CORPUS_HINT = (
    "two-pass selectivity needs a loader that yields the same batches in the same order on every pass (no random "
    "augmentation, no shuffle=True) and a deterministic model; otherwise use selectivity='exact' or 'histogram'"
)


def _corpus_change(batch_sizes: list[list[int]], first: SparsityTracker, second: SparsityTracker) -> str | None:
    """How pass 2 differs from pass 1 on this process (first differing batch), or None.

    Batches are compared by size, then by the checksums of every layer's per-sample maxima:
    equal checksums mean (up to a hash collision) that both passes counted the same maxima.
    """
    one, two = batch_sizes
    for index, (a, b) in enumerate(zip(one, two)):
        if a != b:
            return f"batch {index} has {b} images in pass 2 but {a} in pass 1"
    if len(two) < len(one):
        return (f"pass 2 yielded fewer batches, {len(two)} ({sum(two)} images) against {len(one)} ({sum(one)} "
                f"images) in pass 1: batch {len(two)} is missing")
    if len(two) > len(one):
        return (f"pass 2 yielded more batches, {len(two)} ({sum(two)} images) against {len(one)} ({sum(one)} "
                f"images) in pass 1: batch {len(one)} is extra")
    # One checksum per batch and layer (a feature is measured once per forward); pass 2 measures
    # the features of pass 1 and no others.
    first_change = None
    for name, s in second.stats.items():
        a, b = first.stats[name].batch_checksums().cpu(), s.batch_checksums().cpu()
        if a.shape != b.shape:
            return f"layer {name!r} was measured in {a.numel()} batches in pass 1 but {b.numel()} in pass 2"
        differs = (a != b).nonzero().flatten().tolist()
        if differs and (first_change is None or differs[0] < first_change[0]):
            first_change = (differs[0], name)
    if first_change is None:
        return None
    index, name = first_change
    start = sum(one[:index])
    return (f"batch {index} (images {start} to {start + one[index] - 1}) holds different content in pass 2: "
            f"the checksum of the per-sample maxima of layer {name!r} differs")


def _agree(change: str | None, distributed: bool, device: torch.device) -> None:
    """Raise CorpusChangedError on every rank when any rank's pass 2 differed (so no rank is left
    waiting in a collective), each naming what its own loader did."""
    failed = [change is not None]
    if distributed:
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=_comm_device(device))
        flags[dist.get_rank()] = int(change is not None)
        dist.all_reduce(flags)
        failed = flags.bool().tolist()
    if not any(failed):
        return
    if change is None:
        ranks = [r for r, bad in enumerate(failed) if bad]
        change = f"the loader of rank(s) {ranks} yielded different batches in pass 2 (their errors say how)"
    raise CorpusChangedError(f"analyze: the second pass did not see the corpus of the first: {change}. "
                             f"{_SAME_CORPUS_HINT}")
