"""Live progress: the records a run reports, their plain-line rendering off a terminal (fake clock),
tqdm bars on one, a training run's own lines, and a parallel sweep's line per worker."""
import io
import json

import pytest

from sparsekern.train import RunConfig, train
from sparsekern.train import progress
from sparsekern.train.progress import PROGRESS_FILE_ENV, ProgressConsole, RunProgress, describe
from sparsekern.train.sweep import run_many

TINY = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=64, num_test_samples=32,
            eval_batch_size=32, threads=1, steps=12, eval_every=4, selectivity="none")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(run="adam-l2", phase="train", done=0, total=6000, rate=None, eval_step=None, test_error=None, dead=None):
    return {"run": run, "phase": phase, "done": done, "total": total, "seconds_per_unit": rate,
            "eval_step": eval_step, "test_error": test_error, "dead_pct": dead}


def test_describe_says_step_rate_eta_and_the_last_eval_point():
    assert describe(record(done=0)) == "step 0/6000 (0%) | no eval point yet"
    assert describe(record(done=1200, rate=0.041, eval_step=1000, test_error=0.123, dead=21.04)) == (
        "step 1200/6000 (20%), 0.041 s/step, ETA 3:17 | eval at step 1000: test error 12.30%, 21.0% dead")
    assert describe(record(done=5, total=100005, rate=0.05, eval_step=5, test_error=0.5)).endswith(
        "ETA 1:23:20 | eval at step 5: test error 50.00%, - dead")
    assert describe(record(phase="analysis", done=30000, total=120000, rate=1 / 1500)) == (
        "final analysis 30,000/120,000 images (25%), 1,500 img/s, ETA 1:00")


def test_run_progress_sends_at_most_one_record_per_interval_but_every_eval_point():
    clock, sent = Clock(), []
    report = RunProgress("r", sent.append, clock=clock, interval=1.0)
    report.start("train", 100, 200)  # resumed at step 100
    clock.now = 0.5
    report.advance(101)
    clock.now = 2.0
    report.advance(104)
    report.evaluated(104, 0.25, 10.0)
    assert [(r["done"], r["seconds_per_unit"], r["eval_step"]) for r in sent] == [
        (100, None, None), (104, 0.5, None), (104, 0.5, 104)]
    report.start("analysis", 0, 64)
    clock.now = 2.5
    report.advance(64)  # held back: under a second since the last record
    report.flush()
    assert [(r["phase"], r["done"]) for r in sent[3:]] == [("analysis", 0), ("analysis", 64)]
    assert sent[-1]["seconds_per_unit"] == pytest.approx(0.5 / 64)
    assert RunProgress("quiet", None).start("train", 0, 1) is None  # no sink: nothing to do


def test_plain_lines_at_eval_points_and_heartbeats_one_per_worker():
    clock, out = Clock(), io.StringIO()
    console = ProgressConsole(out, tty=False, clock=clock)
    shows = [  # (time, slot, record)
        (0, 0, record(done=0)),                                            # a new run: printed
        (1, 0, record(done=10, rate=0.1)),                                 # nothing new
        (2, 1, record(run="msgd-l2", done=0)),                             # the other worker's run
        (3, 0, record(done=20, rate=0.1, eval_step=20, test_error=0.5)),  # eval point, 3 s < MIN_GAP after the last
        (6, 0, record(done=25, rate=0.1, eval_step=20, test_error=0.5)),  # ... printed once MIN_GAP has passed
        (20, 0, record(done=40, rate=0.1, eval_step=20, test_error=0.5)),
        (37, 0, record(done=50, rate=0.1, eval_step=20, test_error=0.5)),  # HEARTBEAT after the last line
        (80, 0, record(done=50, rate=0.1, eval_step=20, test_error=0.5)),  # no progress: no line
        (81, 0, record(phase="analysis", done=0, total=600)),              # a new phase
    ]
    for when, slot, rec in shows:
        clock.now = when
        console.show(slot, rec)
    clock.now = 82
    console.show(0, record(phase="analysis", done=600, total=600, rate=0.001), last=True)  # the run's end
    assert out.getvalue().splitlines() == [
        "adam-l2: step 0/6000 (0%) | no eval point yet",
        "msgd-l2: step 0/6000 (0%) | no eval point yet",
        "adam-l2: step 25/6000 (0%), 0.100 s/step, ETA 9:58 | eval at step 20: test error 50.00%, - dead",
        "adam-l2: step 50/6000 (1%), 0.100 s/step, ETA 9:55 | eval at step 20: test error 50.00%, - dead",
        "adam-l2: final analysis 0/600 images (0%)",
        "adam-l2: final analysis 600/600 images (100%), 1,000 img/s, ETA 0:00",
    ]


def test_terminal_gets_one_bar_per_worker():
    out = io.StringIO()
    console = ProgressConsole(out, tty=True)
    console.show(0, record(done=100, rate=0.04, eval_step=100, test_error=0.2, dead=3.0))
    console.show(1, record(run="msgd-l2", done=50, rate=0.05))
    console.show(0, record(phase="analysis", done=10, total=20, rate=0.01))
    messages = []
    console.write(messages.append, "finished adam-l2")
    console.close()
    text = out.getvalue()
    assert "adam-l2" in text and "msgd-l2" in text and "0.050 s/step" in text and "final analysis 10/20" in text
    assert messages == ["finished adam-l2"]


def test_training_prints_progress_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    monkeypatch.setattr(progress, "MIN_GAP", 0.0)  # every eval point gets its line
    config = RunConfig(**TINY, out_dir=str(tmp_path))
    train(config, progress=True, log=lambda m: None)
    name = config.run_dir().name
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"{name}: step 0/12 (0%) | no eval point yet"
    for step in (4, 8, 12):
        assert any(line.startswith(f"{name}: step {step}/12 ") and f"eval at step {step}: test error " in line
                   and "s/step, ETA" in line and "% dead" in line for line in lines), step
    assert lines[-1] == f"{name}: final analysis 0/64 images (0%)"


def test_training_without_progress_prints_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    train(RunConfig(**TINY, out_dir=str(tmp_path)), progress=False, log=lambda m: None)
    assert capsys.readouterr().err == ""


def test_a_worker_writes_its_progress_to_the_file_its_parent_names(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    train(RunConfig(**TINY, out_dir=str(tmp_path)), progress=False, log=lambda m: None)
    last = json.loads(path.read_text())
    assert (last["phase"], last["done"], last["total"], last["eval_step"]) == ("analysis", 64, 64, 12)


@pytest.mark.slow
def test_parallel_sweep_shows_each_workers_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    configs = [RunConfig(**TINY, seed=seed, out_dir=str(tmp_path)) for seed in (0, 1, 2)]
    statuses = run_many(configs, workers=2, progress=True, log=lambda m: None)
    assert [s["status"] for s in statuses] == ["done"] * 3
    lines = capsys.readouterr().err.splitlines()
    for config in configs:  # a worker's last record is shown when it exits
        assert f"{config.run_dir().name}: final analysis 64/64 images (100%)" in "\n".join(lines)
        assert not (config.run_dir() / "progress.json").exists()


@pytest.mark.slow
def test_demo_shows_progress_for_each_of_its_runs(tmp_path, capsys, monkeypatch):
    """The demo's two workers on 200 Fashion-MNIST images: every run has progress lines, through
    its final analysis."""
    from sparsekern.demo import QUICK, run_demo

    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    tiny = QUICK.__class__(**{**QUICK.__dict__, "width": 0.125, "steps": 4, "eval_every": 2, "num_train_samples": 200,
                              "num_test_samples": 100, "analyze_samples": 100})
    summary = run_demo(tmp_path, settings=tiny, workers=2, progress=True, log=lambda m: None)
    assert summary["failed"] == []
    err = capsys.readouterr().err
    for name in ("adam-l2", "msgd-l2", "adam-none", "adam-wd"):
        assert f"\n{name}: final analysis 100/100 images (100%)" in "\n" + err, name
