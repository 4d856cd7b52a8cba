"""`make bench` (benchmarks/run_all.py) names scripts that exist and whose arguments they accept."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)


@pytest.mark.parametrize("name", sorted(run_all.BENCHMARKS))
def test_each_benchmark_script_exists_and_parses_its_arguments(name):
    script, extra = run_all.BENCHMARKS[name]
    assert (BENCH / script).is_file(), script
    # --help after the real arguments: a bad value fails (exit 2) as it is parsed; an unknown
    # option would not, so each option must also appear in the help text.
    out = subprocess.run([sys.executable, str(BENCH / script), *extra, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr
    for option in (a for a in extra if a.startswith("--")):
        assert option in out.stdout, f"{script} has no option {option}"


def test_unknown_benchmark_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "channel_absmax,nope"])
    assert exc.value.code == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err
