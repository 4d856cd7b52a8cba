"""Checkpoints that survive a crash at any moment and are checked before use; run-directory locks.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
moved over the old one with ``os.replace`` (atomic on POSIX), so a reader only ever sees a
complete old or a complete new file. The file it replaces is kept as ``<name>.prev.pt``: when
the latest cannot be read (corrupt, truncated, missing), ``load_checkpoint`` falls back to the
previous one with a warning that says how many steps are lost.

Loading uses ``torch.load(weights_only=True)``: the file holds tensors and plain Python values
only (RNG states are converted to those), never pickled code. Format 2 adds ``checksum``: a
sha256 over the whole payload (every tensor's dtype, shape and bytes, every plain value), so a
flipped bit in tensor data is found; the schedule (``total_steps``, ``eval_every``) the step is
checked against is stored too. Format 1 files (no checksum) are refused with a clear error.

One training process at a time per run directory: ``RunLock`` holds ``flock`` on ``.lock``
(released by the kernel when the holder dies, even by SIGKILL) and writes the holder's PID and
host into it, for the error a second process gets.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from sparsekern.errors import CheckpointError, CorruptCheckpointError, RunLockedError

FORMAT_VERSION = 2
REQUIRED_KEYS = ("step", "total_steps", "eval_every")  # what a checkpoint's step is checked with
LOCK_FILE = ".lock"


# ---------------------------------------------------------------------- atomic writes
def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _atomic_write(path, write, mode: str, keep_previous: Path | None = None) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync it, then move it over ``path``.

    ``keep_previous``: first move the current ``path`` there (a crash between the two renames
    leaves only the previous file, which the loader falls back to).
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with tmp.open(mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def previous_path(path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path, state: dict) -> None:
    """Atomically write ``state`` (with format version and checksum) to ``path``, keeping the old file
    as ``previous_path(path)``. ``state`` holds ``step`` and its schedule, ``total_steps`` and ``eval_every``."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): the state lacks {', '.join(missing)}")
    payload = {k: v for k, v in state.items() if k not in ("format_version", "checksum")}
    payload["format_version"] = FORMAT_VERSION
    payload["checksum"] = payload_checksum(payload)
    _atomic_write(path, lambda fh: torch.save(payload, fh), "wb", keep_previous=previous_path(path))


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically, like a checkpoint."""
    _atomic_write(path, lambda fh: fh.write(text), "w")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- checksum
def payload_checksum(state: dict) -> str:
    """sha256 over every entry of ``state`` except ``checksum``: tensors by dtype, shape and bytes,
    plain values by type and repr, containers by length and order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):  # a tuple may come back from torch.load as either
        digest.update(f"list {len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)  # exact for floats; the length keeps the stream unambiguous
        digest.update(f"{type(value).__name__} {len(text)}:{text}".encode())
    else:
        raise TypeError(f"checkpoint payload: cannot checksum a {type(value).__name__}")


# ---------------------------------------------------------------------- loading
def read_checkpoint(path, map_location="cpu") -> dict:
    """One checkpoint file, verified: readable, of this format, checksum matching.

    Raises CorruptCheckpointError (unreadable, checksum mismatch) or CheckpointError (another format).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CorruptCheckpointError(
            f"{path}: checkpoint cannot be read ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from exc
    version = state.get("format_version") if isinstance(state, dict) else None
    if version == 1:
        raise CheckpointError(f"{path}: checkpoint of format 1 (an older sparsekern, without a checksum); this "
                              f"version reads format {FORMAT_VERSION} only. Rerun with --restart to train it again.")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a sparsekern checkpoint of format {FORMAT_VERSION} "
                              f"(format_version={version!r}); rerun with --restart to discard it.")
    stored, actual = state.get("checksum"), payload_checksum(state)
    if stored != actual:
        raise CorruptCheckpointError(f"{path}: checksum mismatch (stored {str(stored)[:16]}, contents "
                                     f"{actual[:16]}); the file is corrupt")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; rerun with --restart to discard it.")
    return state


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def load_with_fallback(path, *, config_hash: str, config: dict, schedule: tuple[int, int] | None = None,
                       map_location="cpu", warn=_warn) -> tuple[dict, Path]:
    """(state, the file it came from): ``path``, or its previous checkpoint when ``path`` is corrupt or
    missing (``warn`` is told, naming both files and the steps lost).

    Then checks the state belongs to this run: its config (``config_hash``; the message names the
    fields that differ), its schedule (``schedule`` = the run's (total steps, eval_every), when
    given) and its step (an eval point of that schedule). Raises CheckpointError naming the file
    when neither file can be used or a check fails.
    """
    path = Path(path)
    previous = previous_path(path)
    try:
        if not path.exists() and previous.exists():
            raise CorruptCheckpointError(f"{path}: missing")
        state, source = read_checkpoint(path, map_location), path
    except CorruptCheckpointError as latest_error:
        if not previous.exists():
            raise CheckpointError(f"{latest_error}. Delete it, or rerun with --restart to discard it and "
                                  "start over.") from latest_error
        try:
            state, source = read_checkpoint(previous, map_location), previous
        except CorruptCheckpointError as previous_error:
            raise CheckpointError(f"{latest_error}; and the previous one: {previous_error}. Rerun with --restart "
                                  "to start over.") from previous_error
        # The latest was written at the eval point after the previous one.
        step = state["step"]
        lost = min(step + state["eval_every"], state["total_steps"]) - step
        warn(f"warning: {latest_error}. Falling back to the previous checkpoint {previous} at step {step}: "
             f"the {lost} steps after it are lost (trained again on resume).")
    _check_config(source, state, config_hash, config)
    stored = (state["total_steps"], state["eval_every"])
    if schedule is not None and tuple(schedule) != stored:
        raise CheckpointError(
            f"{source}: checkpoint of a {stored[0]}-step run with an eval point every {stored[1]} steps, but "
            f"this run has {schedule[0]} steps, every {schedule[1]} (another training set size?). Rerun with "
            "--restart, or use another run directory.")
    check_step(source, state["step"], *stored)
    return state, source


def load_checkpoint(path, *, config_hash: str, config: dict, schedule: tuple[int, int] | None = None,
                    map_location="cpu", warn=_warn) -> dict:
    """The checked state of the checkpoint at ``path`` (or of its previous one): see ``load_with_fallback``."""
    return load_with_fallback(path, config_hash=config_hash, config=config, schedule=schedule,
                              map_location=map_location, warn=warn)[0]


def _check_config(path: Path, state: dict, config_hash: str, config: dict) -> None:
    if state.get("config_hash") != config_hash:
        theirs = state.get("config", {})
        diffs = [f"{k}: {theirs.get(k)!r} in the checkpoint, {config.get(k)!r} now"
                 for k in sorted(set(theirs) | set(config)) if theirs.get(k) != config.get(k)]
        raise CheckpointError(
            f"{path}: checkpoint was written by a different configuration "
            f"(hash {state.get('config_hash')} vs {config_hash}; {'; '.join(diffs) or 'fields unknown'}). "
            "Rerun with --restart to discard it, or use another run directory."
        )


def check_step(path, step, total_steps: int, eval_every: int) -> None:
    """A run checkpoints at its eval points only (every ``eval_every`` steps, and at ``total_steps``):
    raise CheckpointError naming the values when ``step`` is not one of them."""
    on_schedule = isinstance(step, int) and 1 <= step <= total_steps and (
        step % eval_every == 0 or step == total_steps)
    if not on_schedule:
        raise CheckpointError(
            f"{path}: checkpoint claims step={step!r}, which is not an eval point of its run ({total_steps} "
            f"steps, an eval point every {eval_every} steps and at the last); the file does not belong to "
            "this run. Rerun with --restart to discard it."
        )


# ---------------------------------------------------------------------- run-directory lock
class RunLock:
    """``with RunLock(run_dir):`` holds the exclusive lock of a run directory, or raises RunLockedError
    naming the holder (PID and host). The kernel releases it when the holder exits or is killed."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fh = None

    def __enter__(self) -> "RunLock":
        fh = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fh.read())
            fh.close()
            raise RunLockedError(
                f"{self.run_dir}: run directory is in use by {holder} (lock file {self.path}); two processes "
                "training one run would interleave its checkpoints and metrics. Wait for it to finish or stop it."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()  # closing the file releases the lock; the file stays (removing it would race)
        self._fh = None


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its PID yet
        return "another process (PID not yet recorded)"


def ensure_unlocked(run_dir) -> None:
    """Raise RunLockedError (naming the holder) when another process holds the lock of ``run_dir``."""
    if (Path(run_dir) / LOCK_FILE).exists():
        with RunLock(run_dir):
            pass


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the ``.<name>.tmp-<PID>`` files of processes that are gone (killed mid-write); returns them."""
    removed = []
    for path in sorted(Path(directory).glob(".*.tmp-*")):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ---------------------------------------------------------------------- RNG states
def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """torch (CPU and, if initialised, CUDA), numpy, python and the named generators' states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])
