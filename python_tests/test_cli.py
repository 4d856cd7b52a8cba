"""The command line: --help of every subcommand, train / analyze / info through main([...]),
flag and TOML precedence, clear errors for bad input, and a smoke run of the demo."""
import argparse
import json
from dataclasses import dataclass, field

import pytest
import torch

from sparsekern.cli import SUBCOMMANDS, main
from sparsekern.train import RunConfig

TINY_FLAGS = ["--dataset", "synthetic", "--width", "0.125", "--batch-size", "8", "--num-train-samples", "32",
              "--num-test-samples", "16", "--eval-batch-size", "32", "--steps", "4", "--eval-every", "2",
              "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: sparsekern {command}" in capsys.readouterr().out


def test_train_then_analyze_through_main(tmp_path, capsys):
    assert main(["train", *TINY_FLAGS, "--out-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = tmp_path / printed["run_dir"].split("/")[-1]
    result = json.loads((run_dir / "result.json").read_text())
    assert printed["test_error"] == result["test_error"]
    assert printed["dead_by_gamma_pct"] == result["total"]["dead_by_gamma_pct"]

    # The same command again: nothing to do.
    assert main(["train", *TINY_FLAGS, "--out-dir", str(tmp_path)]) == 0
    assert "already complete" in capsys.readouterr().err

    # analyze the checkpoint on the run's 32 training samples: the same counts as result.json.
    out = tmp_path / "analysis.json"
    assert main(["analyze", str(run_dir / "checkpoint.pt"), "--samples", "32", "--json", str(out),
                 "--no-progress"]) == 0
    assert "features.c1" in capsys.readouterr().out
    analysis = json.loads(out.read_text())
    assert analysis["num_images"] == 32
    for layer, mine in zip(analysis["report"]["layers"], result["layers"]):
        assert layer["inactive_by_activation"][0]["count"] == mine["dead_by_activation"]
        assert layer["inactive_by_gamma"][0]["count"] == mine["dead_by_gamma"]


def test_toml_config_with_flag_overrides(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text(RunConfig(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=32,
                                     num_test_samples=16, steps=4, eval_every=2, lr=5e-3, seed=3, threads=1,
                                     out_dir=str(tmp_path), name="from-toml").to_toml())
    assert main(["train", "--config", str(config_file), "--lr", "0.002", "--stop-after", "2", "--no-progress"]) == 0
    written = RunConfig.from_toml(tmp_path / "from-toml" / "config.toml")
    assert written.lr == 0.002 and written.seed == 3 and written.batch_size == 8
    assert torch.load(tmp_path / "from-toml" / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1"], "lr=-1.0: must be a finite number > 0"),
    (["train", "--optimizer", "adamw"], "optimizer='adamw'"),
    (["train", "--config", "/nonexistent/run.toml"], "config file not found"),
    (["report", "/nonexistent/sweep"], "sweep_summary.json"),
    (["analyze", "/nonexistent/run"], "config.toml and checkpoint.pt"),
    (["sweep", "--out", "/tmp/x", "--seeds", "0,a"], "grid seed='0,a'"),
])
def test_bad_input_exits_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", "many"])
    assert info.value.code == 2
    assert "--steps: invalid int value: 'many'" in capsys.readouterr().err


def test_info_prints_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "available" in info


def test_demo_configs_are_the_papers_four_settings(tmp_path):
    from sparsekern.demo import FULL, QUICK, demo_configs

    for settings in (QUICK, FULL):
        labelled = demo_configs(settings, tmp_path)
        assert [label for label, _ in labelled] == ["Adam + L2", "mSGD + L2", "Adam, no reg", "Adam + WD"]
        assert [(c.optimizer, c.reg) for _, c in labelled] == [("adam", "l2"), ("momentum", "l2"), ("adam", "none"),
                                                               ("adam", "wd")]
        assert all(c.model == "basicnet" and c.dataset == "fashion-mnist" for _, c in labelled)
    assert FULL.width == 1.0 and FULL.epochs == 40 and FULL.steps is None


@pytest.mark.slow
def test_demo_smoke_run_on_real_fashion_mnist(tmp_path):
    """The demo's whole pipeline on 200 Fashion-MNIST images and 4 steps per setting."""
    from sparsekern.demo import QUICK, run_demo

    tiny = QUICK.__class__(**{**QUICK.__dict__, "width": 0.125, "steps": 4, "eval_every": 2, "num_train_samples": 200,
                              "num_test_samples": 100, "analyze_samples": 100})
    messages = []
    summary = run_demo(tmp_path, settings=tiny, workers=1, progress=False, log=messages.append)
    assert summary["failed"] == []
    assert [g["label"] for g in summary["groups"]] == ["Adam + L2", "mSGD + L2", "Adam, no reg", "Adam + WD"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "fig4_gamma_decay.png").is_file()
    table = messages[-1]
    assert "Adam + WD" in table and "dead |γ|<1e-3" in table and "report:" in table
    assert [r["run_dir"] for r in summary["runs"]] == ["runs/adam-l2", "runs/msgd-l2", "runs/adam-none", "runs/adam-wd"]
    for run in summary["runs"]:
        result = json.loads((tmp_path / run["run_dir"] / "result.json").read_text())
        assert result["analysis_samples"] == 100 and result["train_samples"] == 200
        assert f"{100 * (1 - result['test_error']):.2f}%" in table


# ---------------------------------------------------------------------- config flags
@dataclass(frozen=True)
class _Example:
    seeds: tuple[int, ...] = field(default=(0, 1), metadata={"help": "seeds"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio, 50% by default"})
    quick: bool = field(default=False, metadata={"help": "quick"})
    milestones: tuple = field(default=(0.5,), metadata={"help": "a bare tuple holds floats"})


def test_one_flag_helper_turns_any_config_dataclass_into_flags_and_back():
    from sparsekern._flags import add_config_flags, config_overrides

    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Example, "example")
    args = parser.parse_args(["--seeds", "3, 4", "--ratio", "none", "--no-quick", "--milestones", "0.25,0.75"])
    assert config_overrides(_Example, args) == {"seeds": (3, 4), "ratio": None, "quick": False,
                                                "milestones": (0.25, 0.75)}
    assert config_overrides(_Example, parser.parse_args([])) == {}  # only what is given overrides a file
    assert config_overrides(_Example, parser.parse_args(["--ratio", "0.5"])) == {"ratio": 0.5}
    assert "(default: 0,1)" in parser.format_help() and "50% by default" in parser.format_help()


@pytest.mark.parametrize("argv, field_name, value", [
    (["train", "--lr-milestones", "0.3,0.6"], "lr_milestones", (0.3, 0.6)),  # RunConfig
    (["train", "--steps", "none"], "steps", None),
    (["keep-ratio", "--seeds", "4,5"], "seeds", (4, 5)),  # an experiment config
    (["cges-vs-l2", "--models", "lenet5"], "models", ("lenet5",)),
    (["compare-methods", "--fractions", "0.1,0.2"], "fractions", (0.1, 0.2)),
])
def test_run_and_experiment_configs_parse_their_flags_alike(argv, field_name, value):
    from sparsekern.cli import build_parser

    assert getattr(build_parser().parse_args(argv), field_name) == value
