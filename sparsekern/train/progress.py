"""Live progress of training runs on the console: step / total, s/step, ETA, the last eval point.

A run reports through a ``RunProgress`` (the training loop feeds it); its records go

* to a ``ProgressConsole`` on stderr, in the process that trains (``sparsekern train``, a sweep
  or demo with one worker);
* to the file named by ``$SPARSEKERN_PROGRESS_FILE`` in a sweep's worker subprocess: the parent
  sets it (``<run>/progress.json``), reads the records back and draws one line per worker.

On a terminal each worker's run has a line that tqdm redraws in place (``position`` = the
worker's slot). Elsewhere (CI
logs, ``make demo > log 2>&1``) a plain line per run is printed when the run or its phase
changes, at a new eval point (at most one per MIN_GAP seconds) and, while it advances, at
least every HEARTBEAT seconds.

A record is a dict: ``run`` (the run directory's name), ``phase`` ("train" or "analysis"),
``done`` / ``total`` (steps, or images over all analysis passes), ``seconds_per_unit`` (None until
measured), ``eval_step``, ``test_error`` and ``dead_pct`` (% of features dead by activation in
that eval point's training window; all None before the first eval point).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

PROGRESS_FILE_ENV = "SPARSEKERN_PROGRESS_FILE"
PROGRESS_FILE = "progress.json"
MIN_GAP = 5.0     # plain lines: at most one per run this often at eval points...
HEARTBEAT = 30.0  # ...and at least one this often while the run advances


# ---------------------------------------------------------------------- the reporting side
class RunProgress:
    """Builds one run's progress records and hands them to ``sink`` (None: nowhere), at most one per
    ``interval`` seconds except at phase changes and eval points."""

    def __init__(self, run: str, sink: Callable[[dict], None] | None, *, clock=time.monotonic,
                 interval: float = 1.0):
        self.sink, self.clock, self.interval = sink, clock, interval
        self.record = {"run": run, "phase": None, "done": 0, "total": 0, "seconds_per_unit": None,
                       "eval_step": None, "test_error": None, "dead_pct": None}
        self._start = (0.0, 0)  # (time, done) where the current phase's rate is measured from
        self._sent = 0.0

    def start(self, phase: str, done: int, total: int) -> None:
        """A new phase ("train" from step ``done``, or "analysis" of ``total`` images)."""
        self.record.update(phase=phase, done=done, total=total, seconds_per_unit=None)
        self._start = (self.clock(), done)
        self._send()

    def advance(self, done: int) -> None:
        """``done`` units of the phase are finished; sent when ``interval`` has passed since the last record."""
        self.record["done"] = done
        if self.sink is not None and self.clock() - self._sent >= self.interval:
            self._send()

    def evaluated(self, step: int, test_error: float, dead_pct: float | None) -> None:
        self.record.update(eval_step=step, test_error=test_error, dead_pct=dead_pct)
        self._send()

    def flush(self) -> None:
        """Send the current record now (the end of a phase, which ``advance`` may have held back)."""
        self._send()

    def _send(self) -> None:
        if self.sink is None:
            return
        now = self.clock()
        started, done_then = self._start
        if self.record["done"] > done_then:
            self.record["seconds_per_unit"] = (now - started) / (self.record["done"] - done_then)
        self._sent = now
        self.sink(dict(self.record))


def write_progress_file(path: Path, record: dict) -> None:
    """Replace ``path`` by ``record`` atomically (a reader sees a whole record); no fsync: it is only a display."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_progress_file(path: Path) -> dict | None:
    """The record a worker wrote last, or None when there is none (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


class CountingLoader:
    """Iterates ``loader`` (again on every pass) and tells ``on_images`` how many images went through so far."""

    def __init__(self, loader, on_images: Callable[[int], None]):
        self.loader, self.on_images = loader, on_images
        self.images = 0

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.images += len(batch[0] if isinstance(batch, (tuple, list)) else batch)
            self.on_images(self.images)

    def __len__(self) -> int:
        return len(self.loader)


@contextlib.contextmanager
def run_progress(run: str, enabled: bool):
    """The RunProgress of one run trained in this process.

    To ``$SPARSEKERN_PROGRESS_FILE`` when a parent process draws it, else to a console on stderr
    when ``enabled``, else nowhere.
    """
    path = os.environ.get(PROGRESS_FILE_ENV)
    if path:
        yield RunProgress(run, lambda record: write_progress_file(Path(path), record))
    elif enabled:
        console = ProgressConsole()
        try:
            yield RunProgress(run, lambda record: console.show(0, record))
        finally:
            console.close()
    else:
        yield RunProgress(run, None)


# ---------------------------------------------------------------------- the drawing side
def describe(record: dict) -> str:
    """'step 1200/6000 (20%), 0.041 s/step, ETA 3:17 | eval at step 1000: test error 12.30%, 21.0% dead'."""
    done, total, rate = record["done"], record["total"], record["seconds_per_unit"]
    training = record["phase"] == "train"
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    text = f"step {done}/{total}{percent}" if training else f"final analysis {done:,}/{total:,} images{percent}"
    if rate is not None:
        speed = f"{rate:.3f} s/step" if training else f"{1 / rate:,.0f} img/s" if rate > 0 else "- img/s"
        text += f", {speed}, ETA {_duration(rate * (total - done))}"
    if training:
        if record["eval_step"] is None:
            text += " | no eval point yet"
        else:
            dead = "-" if record["dead_pct"] is None else f"{record['dead_pct']:.1f}%"
            text += (f" | eval at step {record['eval_step']}: test error {100 * record['test_error']:.2f}%, "
                     f"{dead} dead")
    return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressConsole:
    """Draws progress records, one line per slot (worker): tqdm bars on a terminal, plain lines elsewhere."""

    def __init__(self, stream=None, *, tty: bool | None = None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._bars = {}     # slot -> its tqdm line
        self._printed = {}  # slot -> (record printed last, when)

    def show(self, slot: int, record: dict, *, last: bool = False) -> None:
        """Draw ``record`` on ``slot``'s line; ``last``: the run's final record, printed unless it was already."""
        if self.tty:
            self._draw(slot, record)
        elif self._due(slot, record) or (last and self._printed[slot][0] != record):
            self._printed[slot] = (record, self.clock())
            print(f"{record['run']}: {describe(record)}", file=self.stream, flush=True)

    def _due(self, slot: int, record: dict) -> bool:
        if slot not in self._printed:
            return True
        last, when = self._printed[slot]
        waited = self.clock() - when
        if (last["run"], last["phase"]) != (record["run"], record["phase"]):
            return True
        if last["eval_step"] != record["eval_step"]:
            return waited >= MIN_GAP
        return record["done"] != last["done"] and waited >= HEARTBEAT

    def _draw(self, slot: int, record: dict) -> None:
        # tqdm keeps one line per position and redraws it; the line is the plain line's text.
        from tqdm.auto import tqdm

        if slot not in self._bars:
            self._bars[slot] = tqdm(position=slot, file=self.stream, leave=False, dynamic_ncols=True,
                                    bar_format="{desc}")
        text = f"{record['run']}: {describe(record)}"
        if self._bars[slot].desc != text:  # the parent polls faster than records change
            self._bars[slot].set_description_str(text)

    def write(self, log: Callable[[str], None], message: str) -> None:
        """``log(message)`` without garbling the bars."""
        if not self._bars:
            log(message)
            return
        from tqdm.auto import tqdm

        with tqdm.external_write_mode(file=self.stream):
            log(message)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
