"""Selectivity mode "memmap": the per-sample maxima in a raw float32 (N, C) file on the host.

Exact like "exact", but the maxima live on disk: rows go device -> pinned host buffer
asynchronously (two staging buffers of 2 MiB each, so a batch never waits for the GPU) and are
written to the file a chunk at a time; they are read back in chunks, so the host never needs
the whole array in memory.
"""
from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np
import torch
import torch.distributed as dist

from sparsekern.errors import StateDictError
from sparsekern.stats.checks import state_count
from sparsekern.stats.stores.base import Collective, SelectivityStore, count_below, rows_per_chunk

STAGING_BYTES = 2 << 20  # one pinned staging buffer (and one broadcast block of all_reduce)


def _staging_rows(num_channels: int) -> int:
    return max(1, STAGING_BYTES // (4 * num_channels))


def _read_rows(path: str, num_channels: int, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of a raw float32 (rows, C) file, as a CPU tensor."""
    array = np.memmap(path, dtype=np.float32, mode="r", offset=start * num_channels * 4, shape=(count, num_channels))
    return torch.from_numpy(np.array(array))  # copy: the memmap closes when `array` goes away


def _file_chunks(path: str, num_channels: int, rows: int):
    """The first ``rows`` rows of a raw float32 (rows, C) file, in CPU chunks of bounded size."""
    step = rows_per_chunk(num_channels)
    for start in range(0, rows, step):
        yield _read_rows(path, num_channels, start, min(step, rows - start))


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _MaximaFile:
    """Per-sample maxima in a raw float32 (rows, C) file, written a chunk at a time.

    On CUDA, rows are copied into pinned staging buffers with non_blocking copies on the
    caller's stream; a full buffer is written to the file only when it is needed again, one
    chunk later, so waiting for its copies almost never stalls anything. On the CPU a single
    (ordinary) buffer is written as soon as it fills.
    """

    def __init__(self, path, num_channels: int, device: torch.device, existing_rows: int = 0):
        if path is None:
            fd, path = tempfile.mkstemp(prefix="sparsekern_maxima_", suffix=".f32")
            os.close(fd)
            weakref.finalize(self, _remove_file, path)  # a temporary file lives as long as its store
        self.path = os.fspath(path)
        self.num_channels = num_channels
        self.rows_on_disk = existing_rows
        if existing_rows == 0:
            open(self.path, "wb").close()  # start empty
        elif os.path.getsize(self.path) < existing_rows * num_channels * 4:
            raise ValueError(
                f"memmap file {self.path} holds {os.path.getsize(self.path)} bytes, fewer than the "
                f"{existing_rows} rows x {num_channels} channels x 4 bytes its state says"
            )
        self._cuda = device.type == "cuda"
        rows = _staging_rows(num_channels)
        self._buffers = [
            torch.empty(rows, num_channels, dtype=torch.float32, pin_memory=self._cuda)
            for _ in range(2 if self._cuda else 1)
        ]
        self._events = [None] * len(self._buffers)
        self._active = 0  # buffer being filled
        self._filled = 0  # rows in it
        self._queued: list[tuple[int, int]] = []  # (buffer, rows) full and waiting for the file

    def append(self, m: torch.Tensor) -> None:
        """Queue rows of m (N, C float32, on the stats device) without waiting for them."""
        start = 0
        while start < m.shape[0]:
            buffer = self._buffers[self._active]
            take = min(buffer.shape[0] - self._filled, m.shape[0] - start)
            buffer[self._filled:self._filled + take].copy_(m[start:start + take], non_blocking=self._cuda)
            self._filled += take
            start += take
            if self._cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(m.device))
                self._events[self._active] = event
            if self._filled == buffer.shape[0]:
                self._queued.append((self._active, self._filled))
                self._active = (self._active + 1) % len(self._buffers)
                self._filled = 0
                # The buffer about to be refilled must reach the file first.
                while self._queued and self._queued[0][0] == self._active:
                    self._write(*self._queued.pop(0))

    def append_host(self, rows: torch.Tensor) -> None:
        """Write CPU rows straight to the file (merging, loading, gathering)."""
        self.flush()
        self._write_array(rows.to(torch.float32).contiguous().numpy())

    def flush(self) -> None:
        """Write every staged row to the file (waits for their device copies)."""
        while self._queued:
            self._write(*self._queued.pop(0))
        if self._filled:
            self._write(self._active, self._filled)
            self._filled = 0

    def read_rows(self, start: int, count: int) -> torch.Tensor:
        self.flush()
        return _read_rows(self.path, self.num_channels, start, count)

    def chunks(self):
        """The stored rows, in CPU chunks of bounded size."""
        self.flush()
        return _file_chunks(self.path, self.num_channels, self.rows_on_disk)

    def _write(self, buffer: int, rows: int) -> None:
        if self._events[buffer] is not None:
            self._events[buffer].synchronize()
        self._write_array(self._buffers[buffer][:rows].numpy())

    def _write_array(self, array: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.rows_on_disk * self.num_channels * 4)
            array.tofile(f)
            f.truncate()  # a resumed file may hold stale rows past this point
        self.rows_on_disk += array.shape[0]


class MemmapStore(SelectivityStore):
    """The maxima in the file ``path`` (a temporary file, removed with the store, when None),
    which this store owns and rewrites from its start. N x C x 4 bytes of disk and 4 MiB of
    pinned host memory."""

    mode = "memmap"
    fields = ("memmap_path", "memmap_rows")
    measures_selectivity = True

    def __init__(self, path: str | None):
        self._path = path
        self._file: _MaximaFile | None = None

    @property
    def path(self) -> str | None:
        """The file of the maxima: this store's once started, else the one it was given."""
        return self._path if self._file is None else self._file.path

    def clear(self) -> None:
        self._file = None  # a temporary file goes with its _MaximaFile

    def start(self, num_channels: int, device: torch.device, state: dict | None = None) -> None:
        """With a state naming this store's own file (resuming a checkpoint), the file is used in
        place; any other state's rows are copied in, so two stores never share a file."""
        resume = (state is not None and self._path is not None and os.path.exists(self._path)
                  and os.path.samefile(self._path, state["memmap_path"]))
        self._file = _MaximaFile(self._path, num_channels, device, state["memmap_rows"] if resume else 0)
        if state is not None and not resume:
            for rows in _file_chunks(state["memmap_path"], num_channels, state["memmap_rows"]):
                self._file.append_host(rows)

    def update(self, m: torch.Tensor) -> None:
        self._file.append(m)

    def selectivity(self, t: float, corpus_max: torch.Tensor, num_samples: int):
        return count_below(self._file.chunks(), t, corpus_max).to(torch.float64) / num_samples, None

    def check_merge(self, other: "MemmapStore", where: str) -> None:
        own = self.path
        if own is not None and os.path.exists(own) and os.path.samefile(own, other.path):
            raise ValueError(f"{where}: both stats write the memmap file {own}; give each shard its own file")

    def merge(self, other: "MemmapStore") -> None:
        for block in other._file.chunks():
            self._file.append_host(block)

    def all_reduce(self, collective: Collective) -> None:
        """Every rank broadcasts its rows a staging block at a time; the others append them
        after their own."""
        c = self._file.num_channels
        step = _staging_rows(c)
        for src, rows in enumerate(collective.rows):
            global_src = src if collective.group is None else dist.get_global_rank(collective.group, src)
            for start in range(0, rows, step):
                count = min(step, rows - start)
                if src == collective.rank:
                    block = self._file.read_rows(start, count).to(collective.device)
                else:
                    block = torch.empty(count, c, dtype=torch.float32, device=collective.device)
                dist.broadcast(block, src=global_src, group=collective.group)
                if src != collective.rank:
                    self._file.append_host(block.cpu())

    def state_dict(self) -> dict:
        """The file's path and row count, not its contents (staged rows are written out first)."""
        self._file.flush()
        return {"memmap_path": os.path.abspath(self._file.path), "memmap_rows": self._file.rows_on_disk}

    def check_state(self, sd: dict, fields: dict, num_channels: int, num_samples: int, where: str) -> None:
        """The file must hold the rows; they are not read (that would be a pass over the corpus)."""
        path = sd["memmap_path"]
        if not isinstance(path, str):
            raise StateDictError(f"{where}: field 'memmap_path' must be a str, got {type(path).__name__}")
        rows = state_count(sd, "memmap_rows", where)
        if rows != num_samples:
            raise StateDictError(f"{where}: field 'memmap_rows' ({rows}) must equal num_samples ({num_samples})")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where}: the state's memmap file {path} does not exist")
        if os.path.getsize(path) < rows * num_channels * 4:
            raise StateDictError(f"{where}: memmap file {path} holds {os.path.getsize(path)} bytes, fewer than the "
                                 f"{rows} rows x {num_channels} channels x 4 bytes of 'memmap_rows'")
