"""Run directories under crashes, corruption and concurrency: checkpoint checksums, the previous
checkpoint as a fallback, the step checked against the run, the run lock, metrics.jsonl and
temporary files after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsekern.cli import main
from sparsekern.train import CheckpointError, RunConfig, train
from sparsekern.train.checkpoint import (
    RunLock,
    RunLockedError,
    load_checkpoint,
    read_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from sparsekern.train.loop import load_trained, read_metrics
from sparsekern.train.sweep import run_many

# As in test_train.py: 64 synthetic samples, batch 8 -> 8 steps per epoch; 12 steps, eval points 4, 8, 12.
TINY = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=64, num_test_samples=32,
            eval_batch_size=32, threads=1, steps=12, eval_every=4, selectivity="none")
QUIET = dict(progress=False, log=lambda m: None)


def tiny(tmp_path, **changes) -> RunConfig:
    return RunConfig(**{**TINY, "out_dir": str(tmp_path), **changes})


def train_flags(config: RunConfig) -> list[str]:
    return ["train", "--dataset", "synthetic", "--width", "0.125", "--batch-size", "8", "--num-train-samples", "64",
            "--num-test-samples", "32", "--eval-batch-size", "32", "--threads", "1", "--steps", "12",
            "--eval-every", "4", "--selectivity", "none", "--out-dir", config.out_dir, "--no-progress"]


def flip_a_bit_of(path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes inside the checkpoint file (stored uncompressed)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes must occur once in the file"
    data[at + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def largest_weight(state: dict) -> tuple[str, torch.Tensor]:
    return max(state["model"].items(), key=lambda item: item[1].numel())


# ---------------------------------------------------------------------- checksum
def test_flipped_bit_in_tensor_data_is_a_checksum_error(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=4, **QUIET)
    path = config.run_dir() / "checkpoint.pt"
    name, weight = largest_weight(torch.load(path, weights_only=True))
    flip_a_bit_of(path, weight)
    # torch.load itself takes the damaged file: only the checksum tells.
    assert not torch.equal(torch.load(path, weights_only=True)["model"][name], weight)
    with pytest.raises(CheckpointError) as info:
        train(config, **QUIET)
    assert str(path) in str(info.value) and "checksum mismatch" in str(info.value)
    assert not (config.run_dir() / "result.json").exists()


def test_checkpoint_without_checksum_format_1_is_refused_clearly(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=4, **QUIET)
    path = config.run_dir() / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["checksum"]
    torch.save({**state, "format_version": 1}, path)
    with pytest.raises(CheckpointError, match="format 1 .*without a checksum.*--restart"):
        read_checkpoint(path)


# ---------------------------------------------------------------------- previous checkpoint
def test_corrupt_latest_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    reference = tiny(tmp_path / "reference")
    train(reference, **QUIET)
    config = tiny(tmp_path / "damaged")
    train(config, stop_after=8, **QUIET)
    latest, previous = config.run_dir() / "checkpoint.pt", config.run_dir() / "checkpoint.prev.pt"
    assert torch.load(latest, weights_only=True)["step"] == 8
    assert torch.load(previous, weights_only=True)["step"] == 4
    flip_a_bit_of(latest, largest_weight(torch.load(latest, weights_only=True))[1])

    messages = []
    result = train(config, progress=False, log=messages.append)
    warning = next(m for m in messages if m.startswith("warning:"))
    assert str(latest) in warning and str(previous) in warning and "checksum mismatch" in warning
    assert "at step 4" in warning and "the 4 steps after it are lost" in warning
    assert any("resuming at step 4/12" in m for m in messages)
    assert result is not None and [m["step"] for m in read_metrics(config.run_dir())] == [4, 8, 12]
    assert (config.run_dir() / "checkpoint.corrupt.pt").is_file()  # kept aside, out of the rotation
    assert torch.load(previous, weights_only=True)["step"] == 8
    # Training from the previous checkpoint gives the uninterrupted run's weights.
    ours = torch.load(latest, weights_only=True)["model"]
    theirs = torch.load(reference.run_dir() / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_both_checkpoints_corrupt_is_a_clear_error(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=8, **QUIET)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = config.run_dir() / name
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        train(config, **QUIET)
    assert "checkpoint.pt" in str(info.value) and "checkpoint.prev.pt" in str(info.value)
    assert "--restart" in str(info.value)


def test_a_full_disk_during_a_checkpoint_write_leaves_both_checkpoints_intact(tmp_path, monkeypatch):
    import errno

    config = tiny(tmp_path)
    train(config, stop_after=8, **QUIET)
    save = torch.save

    def disk_full(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(config, **QUIET)  # fails writing the step-12 checkpoint
    monkeypatch.setattr(torch, "save", save)
    run_dir = config.run_dir()
    assert read_checkpoint(run_dir / "checkpoint.pt")["step"] == 8
    assert read_checkpoint(run_dir / "checkpoint.prev.pt")["step"] == 4
    assert not list(run_dir.glob(".*.tmp-*"))
    assert train(config, **QUIET) is not None
    assert [m["step"] for m in read_metrics(run_dir)] == [4, 8, 12]


# ---------------------------------------------------------------------- step against the run
@pytest.mark.parametrize("step", [1000, 6])
def test_checkpoint_step_off_the_runs_schedule_is_an_error(tmp_path, step):
    """The probe's case: step=1000 in a 12-step run (a consistent file, checksum and all) would
    have skipped training and written a 'complete' result.json from step-4 weights."""
    config = tiny(tmp_path)
    train(config, stop_after=4, **QUIET)
    path = config.run_dir() / "checkpoint.pt"
    save_checkpoint(path, {**torch.load(path, weights_only=True), "step": step})
    with pytest.raises(CheckpointError) as info:
        train(config, **QUIET)
    assert f"step={step}" in str(info.value) and "12 steps" in str(info.value) and "every 4" in str(info.value)
    assert not (config.run_dir() / "result.json").exists()


def test_checkpoint_of_another_schedule_is_an_error(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=4, **QUIET)
    with pytest.raises(CheckpointError, match="12-step run with an eval point every 4 steps, but this run has 24"):
        load_checkpoint(config.run_dir() / "checkpoint.pt", config_hash=config.config_hash(),
                        config=config.identity(), schedule=(24, 4))


def test_result_claiming_completion_with_an_earlier_checkpoint_is_an_error(tmp_path):
    config = tiny(tmp_path)
    train(config, **QUIET)
    run_dir = config.run_dir()
    shutil.copy(run_dir / "checkpoint.prev.pt", run_dir / "checkpoint.pt")  # the step-8 weights, consistent
    with pytest.raises(CheckpointError) as info:
        load_trained(run_dir, device="cpu")
    assert "step 8" in str(info.value) and "step 12" in str(info.value) and "result.json" in str(info.value)


# ---------------------------------------------------------------------- lock
def test_second_training_of_a_locked_run_names_the_holder(tmp_path):
    config = tiny(tmp_path)
    config.run_dir().mkdir(parents=True)
    with RunLock(config.run_dir()):
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):
            train(config, **QUIET)
    assert not (config.run_dir() / "metrics.jsonl").exists()
    assert train(config, **QUIET) is not None  # released


def test_lock_of_another_process_is_named_and_released_when_it_is_killed(tmp_path, capsys):
    """A process holding flock on <run>/.lock (the protocol RunLock follows), killed with SIGKILL."""
    config = tiny(tmp_path)
    config.run_dir().mkdir(parents=True)
    holder_code = textwrap.dedent("""
        import fcntl, json, os, socket, sys
        fh = open(sys.argv[1], "a+")
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.truncate(0)
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        fh.flush()
        print("locked", flush=True)
        sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(config.run_dir() / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_flags(config)) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and str(config.run_dir()) in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    assert main(train_flags(config)) == 0


def test_sweep_reports_a_locked_run_and_trains_the_others(tmp_path):
    free, busy = tiny(tmp_path, seed=0), tiny(tmp_path, seed=1)
    busy.run_dir().mkdir(parents=True)
    messages = []
    with RunLock(busy.run_dir()):
        statuses = run_many([free, busy], workers=1, progress=False, log=messages.append)
    assert [s["status"] for s in statuses] == ["done", "failed"]
    assert "RunLockedError" in statuses[1]["error"] and f"process {os.getpid()}" in statuses[1]["error"]
    assert any(busy.run_id() in m and "in use by" in m for m in messages)


@pytest.mark.slow
def test_parallel_sweep_does_not_start_a_locked_run(tmp_path):
    free, busy = tiny(tmp_path, seed=0), tiny(tmp_path, seed=1)
    busy.run_dir().mkdir(parents=True)
    (busy.run_dir() / "train.log").write_text("the holder's log\n")
    with RunLock(busy.run_dir()):
        statuses = run_many([free, busy], workers=2, progress=False, log=lambda m: None)
    assert [s["status"] for s in statuses] == ["done", "failed"]
    assert f"in use by process {os.getpid()}" in statuses[1]["error"]
    assert (busy.run_dir() / "train.log").read_text() == "the holder's log\n"  # not touched


# ---------------------------------------------------------------------- metrics and temp files after a kill
def test_metrics_of_an_attempt_killed_before_its_first_checkpoint_are_dropped(tmp_path):
    config = tiny(tmp_path)
    config.run_dir().mkdir(parents=True)
    # What a run killed while writing its first checkpoint leaves: the eval point's line, half a line
    # of the next (killed while appending), no checkpoint.
    (config.run_dir() / "metrics.jsonl").write_text(json.dumps({"step": 4, "test_error": 0.5}) + '\n{"step": 8, "te')
    train(config, **QUIET)
    assert [m["step"] for m in read_metrics(config.run_dir())] == [4, 8, 12]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no such process now
    stale = tmp_path / f".checkpoint.pt.tmp-{dead_pid}"
    live = tmp_path / f".metrics.jsonl.tmp-{os.getpid()}"
    for path in (stale, live):
        path.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_kill_during_the_first_checkpoint_write_leaves_nothing_duplicated(tmp_path):
    """SIGKILL exactly when the first checkpoint's temp file is written and about to be renamed."""
    config = tiny(tmp_path)
    killer = textwrap.dedent("""
        import os, signal, sys
        rename = os.replace
        def replace(src, dst):
            if str(dst).endswith("checkpoint.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst)
        os.replace = replace
        from sparsekern.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    killed = subprocess.run([sys.executable, "-c", killer, *train_flags(config)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = config.run_dir()
    assert [m["step"] for m in read_metrics(run_dir)] == [4]
    assert not (run_dir / "checkpoint.pt").exists()
    temp_files = list(run_dir.glob(".checkpoint.pt.tmp-*"))
    assert len(temp_files) == 1

    messages = []
    assert train(config, progress=False, log=messages.append) is not None
    assert [m["step"] for m in read_metrics(run_dir)] == [4, 8, 12]
    assert not temp_files[0].exists() and any(str(temp_files[0]) in m and "removed" in m for m in messages)
