"""The command line's errors: every failure of a subcommand is one line and exit code 2
(``--debug`` / SPARSEKERN_DEBUG for the traceback, 130 on Ctrl-C); counts of 0 or below,
a --data-root that does not exist, unknown TOML tables and keys, and a device this machine
does not have are refused before anything runs."""
import json
import pickle

import pytest
import torch

import sparsekern.cli as cli
from sparsekern.cli import main
from sparsekern.train import RunConfig

TINY_FLAGS = ["--dataset", "synthetic", "--width", "0.125", "--batch-size", "8", "--num-train-samples", "32",
              "--num-test-samples", "16", "--eval-batch-size", "32", "--steps", "4", "--eval-every", "2",
              "--threads", "1", "--no-progress"]
# A CUDA device this machine does not have, with or without GPUs.
ABSENT_GPU = f"cuda:{torch.cuda.device_count()}"


def run_cli(argv, capsys):
    """(exit code, stderr) of ``sparsekern <argv>``, whether argparse exits or main returns."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_error_line(err: str, command: str) -> str:
    """The message of stderr's single ``sparsekern <command>: error: ...`` line (and nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"sparsekern {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix):]


@pytest.fixture
def calls(monkeypatch):
    """Record, instead of running, what the subcommands would train / compute."""
    import sparsekern.experiments.cges_vs_l2 as cges_vs_l2
    import sparsekern.experiments.keep_ratio as keep_ratio
    import sparsekern.experiments.method_table as method_table
    import sparsekern.experiments.harvest as harvest
    import sparsekern.train.loop as loop
    import sparsekern.train.sweep as sweep

    made = []
    for module, name in ((loop, "train"), (sweep, "run_sweep"), (harvest, "harvest_run")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: made.append(_name))
    for experiment in (keep_ratio, cges_vs_l2, method_table):  # what each experiment subcommand runs
        name = experiment.COMMAND.run.__name__
        monkeypatch.setattr(experiment.COMMAND, "run", lambda *a, _name=name, **k: made.append(_name))
    return made


# ---------------------------------------------------------------------- any exception: one line, exit 2
@pytest.mark.parametrize("error, line", [
    (KeyError("foo"), "KeyError: 'foo'"),
    (RuntimeError("boom\n  at the second line"), "RuntimeError: boom at the second line"),
    (PermissionError(13, "Permission denied", "x"), "PermissionError: [Errno 13] Permission denied: 'x'"),
    (pickle.UnpicklingError("invalid load key, 'v'."), "UnpicklingError: invalid load key, 'v'."),
    (NotImplementedError(), "NotImplementedError"),
    (ValueError("a bad value"), "a bad value"),  # the project's own kind of error: its message is enough
])
def test_any_exception_of_a_subcommand_is_one_line_and_exit_2(monkeypatch, capsys, error, line):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_info", fail)
    code, err = run_cli(["info"], capsys)
    assert code == 2
    assert one_error_line(err, "info") == line


def test_a_summary_without_its_keys_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "sweep_summary.json").write_text("{}")
    code, err = run_cli(["report", str(tmp_path)], capsys)
    line = one_error_line(err, "report")
    assert code == 2 and line.startswith(f"{tmp_path / 'sweep_summary.json'}: not a sweep summary") and "'runs'" in line


def test_debug_flag_and_environment_variable_give_the_traceback(monkeypatch, capsys):
    def fail(args):
        raise KeyError("foo")

    monkeypatch.setattr(cli, "_cmd_info", fail)
    with pytest.raises(KeyError, match="foo"):
        main(["--debug", "info"])
    monkeypatch.setenv("SPARSEKERN_DEBUG", "1")
    with pytest.raises(KeyError, match="foo"):
        main(["info"])
    monkeypatch.setenv("SPARSEKERN_DEBUG", "0")
    assert run_cli(["info"], capsys)[0] == 2


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    code, err = run_cli(["info"], capsys)
    assert code == 130 and err.strip() == "sparsekern info: interrupted"


# ---------------------------------------------------------------------- counts
@pytest.mark.parametrize("argv, flag, value, minimum", [
    (["train", *TINY_FLAGS, "--stop-after", "0"], "--stop-after", 0, 1),
    (["train", *TINY_FLAGS, "--stop-after", "-5"], "--stop-after", -5, 1),
    (["sweep", "--out", "{tmp}/sweep", *TINY_FLAGS, "--workers", "0"], "--workers", 0, 1),
    (["demo", "--out", "{tmp}/demo", "--workers", "0"], "--workers", 0, 1),
    (["analyze", "{tmp}/run", "--samples", "0"], "--samples", 0, 1),
    (["analyze", "{tmp}/run", "--batch-size", "-1"], "--batch-size", -1, 1),
    (["prune", "{tmp}/run", "--samples", "0"], "--samples", 0, 1),
    (["prune", "{tmp}/run", "--verify-samples", "0"], "--verify-samples", 0, 1),
    (["prune", "{tmp}/run", "--test-samples", "0"], "--test-samples", 0, 1),
    (["prune", "{tmp}/run", "--batch-size", "0"], "--batch-size", 0, 1),
    (["bench", "{tmp}/run", "--repeat", "0"], "--repeat", 0, 1),
    (["bench", "{tmp}/run", "--threads", "0"], "--threads", 0, 1),
    (["bench", "{tmp}/run", "--rounds", "2"], "--rounds", 2, 3),
    (["harvest", "{tmp}/run", "--batch-size", "0"], "--batch-size", 0, 1),
    (["harvest", "{tmp}/run", "--analysis-samples", "0"], "--analysis-samples", 0, 1),
    (["harvest", "{tmp}/run", "--fine-tune-steps", "-1"], "--fine-tune-steps", -1, 0),
])
def test_counts_below_their_minimum_are_argparse_errors(tmp_path, capsys, calls, argv, flag, value, minimum):
    code, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"sparsekern {argv[0]}: error: argument {flag}: "
                                            f"must be >= {minimum}, got {value}")
    assert calls == []


def test_a_count_that_is_not_an_integer(capsys):
    code, err = run_cli(["train", "--stop-after", "2.5"], capsys)
    assert code == 2 and "argument --stop-after: expected an integer, got '2.5'" in err


# ---------------------------------------------------------------------- --data-root
def test_missing_data_root_of_train_is_an_error_naming_it(tmp_path, capsys, calls):
    missing = tmp_path / "no-such-data"
    code, err = run_cli(["train", *TINY_FLAGS, "--dataset", "fashion-mnist", "--data-root", str(missing),
                         "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert f"data_root={str(missing)!r} is not an existing directory" in one_error_line(err, "train")
    assert calls == [] and not (tmp_path / "runs").exists()


def test_missing_data_root_in_a_run_config_is_an_error_at_load_time(tmp_path, capsys, calls):
    config_file = tmp_path / "run.toml"
    missing = tmp_path / "moved"
    config_file.write_text(RunConfig(data_root=str(missing), steps=4, out_dir=str(tmp_path)).to_toml())
    code, err = run_cli(["train", "--config", str(config_file)], capsys)
    assert code == 2
    message = one_error_line(err, "train")
    assert message.startswith(f"{config_file}: ") and repr(str(missing)) in message
    # An explicit existing --data-root replaces it.
    assert run_cli(["train", "--config", str(config_file), "--data-root", str(tmp_path)], capsys)[0] == 0
    assert calls == ["train"]


def test_missing_data_root_of_sweep_is_an_error_before_anything_is_written(tmp_path, capsys, calls):
    missing = tmp_path / "no-such-data"
    code, err = run_cli(["sweep", "--out", str(tmp_path / "sweep"), *TINY_FLAGS, "--seeds", "0,1",
                         "--data-root", str(missing)], capsys)
    assert code == 2 and repr(str(missing)) in one_error_line(err, "sweep")
    assert calls == [] and not (tmp_path / "sweep").exists()


def test_missing_data_root_of_analyze_is_an_argparse_error(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    code, err = run_cli(["analyze", str(tmp_path), "--data-root", str(missing)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"sparsekern analyze: error: argument --data-root: "
                                            f"{str(missing)!r} is not an existing directory")


@pytest.mark.parametrize("command", ["keep-ratio", "cges-vs-l2", "compare-methods"])
def test_missing_data_root_of_an_experiment_is_an_error(tmp_path, capsys, calls, command):
    missing = tmp_path / "no-such-data"
    code, err = run_cli([command, "--quick", "--out", str(tmp_path / "out"), "--data-root", str(missing)], capsys)
    assert code == 2 and repr(str(missing)) in one_error_line(err, command)
    assert calls == []


def test_missing_data_root_of_the_run_harvest_uses_is_an_error(tmp_path, capsys, calls):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    missing = tmp_path / "moved"
    (run_dir / "config.toml").write_text(RunConfig(data_root=str(missing)).to_toml())
    code, err = run_cli(["harvest", str(run_dir), "--train-slimming", "1e-4"], capsys)
    assert code == 2 and repr(str(missing)) in one_error_line(err, "harvest")
    assert calls == []


# ---------------------------------------------------------------------- unknown TOML tables and keys
@pytest.mark.parametrize("command, text, message", [
    ("train", "steps = 4\n[optim]\nlr = 1e-3\n",
     "unknown table [optim]; a run config has no tables but an optional [run]"),
    ("train", "[run]\nsteps = 4\n[trainig]\nlr = 1e-3\n", "[trainig] is outside the [run] table"),
    ("train", "seed = 3\n[run]\nsteps = 4\n", "'seed' is outside the [run] table"),
    ("sweep", '[base]\nsteps = 4\n[grid]\noptimiser = ["adam"]\n',
     "[grid] has unknown field 'optimiser'; known: model,"),
    ("sweep", "[base]\nstep = 4\n", "[base] has unknown field 'step'; known: model,"),
    ("sweep", "[base]\nsteps = 4\n[grids]\nseed = [0, 1]\n",
     "unknown table [grids]; a sweep file has only a [base] and a [grid]"),
    ("sweep", "steps = 4\n[grid]\nseed = [0, 1]\n", "unknown key 'steps' outside a table"),
])
def test_unknown_tables_and_fields_of_a_run_or_sweep_file_are_errors_naming_the_file(tmp_path, capsys, calls,
                                                                                     command, text, message):
    config_file = tmp_path / f"{command}.toml"
    config_file.write_text(text)
    out = ["--out", str(tmp_path / "sweep")] if command == "sweep" else []
    code, err = run_cli([command, "--config", str(config_file), *out], capsys)
    assert code == 2 and one_error_line(err, command).startswith(f"{config_file}: {message}")
    assert calls == []


# ---------------------------------------------------------------------- --device
@pytest.mark.parametrize("argv", [
    ["train", *TINY_FLAGS, "--out-dir", "{tmp}"],
    ["sweep", "--out", "{tmp}/sweep", *TINY_FLAGS],
    ["keep-ratio", "--quick", "--out", "{tmp}"],
    ["cges-vs-l2", "--quick", "--out", "{tmp}"],
    ["compare-methods", "--quick", "--out", "{tmp}"],
])
def test_absent_device_of_a_run_is_an_error(tmp_path, capsys, calls, argv):
    code, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--device", ABSENT_GPU], capsys)
    assert code == 2
    assert one_error_line(err, argv[0]).startswith(f"device={ABSENT_GPU!r} is not available on this machine")
    assert "available: cpu" in err and calls == []


@pytest.mark.parametrize("command", ["analyze", "prune", "bench", "harvest"])
def test_absent_device_of_a_measurement_is_an_argparse_error(tmp_path, capsys, calls, command):
    code, err = run_cli([command, str(tmp_path), "--device", ABSENT_GPU], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(
        f"sparsekern {command}: error: argument --device: device={ABSENT_GPU!r} is not available on this machine")
    code, err = run_cli([command, str(tmp_path), "--device", "gpu"], capsys)
    assert code == 2 and "device='gpu' is not a device name; expected auto, cpu, cuda or cuda:N" in err


@pytest.mark.parametrize("command, run", [("keep-ratio", "run_keep_ratio"), ("cges-vs-l2", "run_cges_vs_l2"),
                                          ("compare-methods", "run_method_table")])
def test_an_experiment_runs_once_its_checks_pass(tmp_path, capsys, calls, command, run):
    """The counterpart of the refusals above: with a data folder and device that exist, the
    subcommand runs its experiment (recorded here) and prints where its table goes."""
    assert main([command, "--quick", "--out", str(tmp_path), "--data-root", str(tmp_path), "--device", "cpu"]) == 0
    assert calls == [run]
    printed = json.loads(capsys.readouterr().out)
    assert printed["out_dir"] == str(tmp_path) and printed["table"].startswith(str(tmp_path))
