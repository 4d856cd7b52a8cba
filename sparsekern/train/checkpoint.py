"""Checkpoints that survive a crash at any moment, and say clearly why they cannot be used.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
moved over the old one with ``os.replace`` (atomic on POSIX and Windows), so a reader only
ever sees a complete old or a complete new file. Loading uses ``torch.load(weights_only=True)``:
the file holds tensors and plain Python values only (RNG states are converted to those).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (unreadable, or written by another config)."""


def _atomic_write(path, write, mode: str) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync it, then move it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open(mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def save_checkpoint(path, state: dict) -> None:
    """Atomically write ``state`` to ``path`` (temp file + fsync + os.replace)."""
    _atomic_write(path, lambda fh: torch.save({"format_version": FORMAT_VERSION, **state}, fh), "wb")


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


def load_checkpoint(path, *, config_hash: str, config: dict, map_location="cpu") -> dict:
    """Read a checkpoint and check it belongs to this run's config.

    Raises CheckpointError naming the file when it is unreadable (truncated, corrupt) or when
    its config differs from ``config`` (naming the fields that differ).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(
            f"{path}: checkpoint cannot be read ({type(exc).__name__}: {exc}); the file is truncated "
            "or corrupt. Delete it, or rerun with --restart to discard it and start over."
        ) from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a sparsekern checkpoint of format {FORMAT_VERSION}; rerun with --restart to discard it."
        )
    if state.get("config_hash") != config_hash:
        theirs = state.get("config", {})
        diffs = [f"{k}: {theirs.get(k)!r} in the checkpoint, {config.get(k)!r} now"
                 for k in sorted(set(theirs) | set(config)) if theirs.get(k) != config.get(k)]
        raise CheckpointError(
            f"{path}: checkpoint was written by a different configuration "
            f"(hash {state.get('config_hash')} vs {config_hash}; {'; '.join(diffs) or 'fields unknown'}). "
            "Rerun with --restart to discard it, or use another run directory."
        )
    return state


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
