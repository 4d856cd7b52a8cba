"""benchmarks/bench_image_pipeline.py in its smallest setting: 32 tiny generated JPEGs in tmp_path.

Checks the JSON, not the speed: every stage has its rows, every rate is positive, and the full
analysis measured exactly the images written to disk (counted independently of the benchmark).
"""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_image_pipeline.py"
spec = importlib.util.spec_from_file_location("bench_image_pipeline", BENCH)
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)

IMAGES = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_pipeline")
    data, out = tmp / "data", tmp / "out.json"
    argv = ["--images", str(IMAGES), "--classes", "3", "--min-px", "36", "--max-px", "48", "--input-size", "32",
            "--batch", "8", "--workers", "0,1", "--models", "resnet18", "--rounds", "1", "--model-batches", "1",
            "--threads", "1", "--device", "cpu", "--gpu-decode", "on", "--data-dir", str(data), "--json", str(out)]
    pipeline.main(argv)
    return data, out, argv


def test_every_row_is_there_with_a_positive_rate(run):
    _, out, _ = run
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert all(r["images_per_s"] > 0 for r in rows), rows
    keys = {(r["stage"], r["model"], r["workers"], r.get("selectivity")) for r in rows}
    expected = {("decode", None, 0, None), ("decode", None, 1, None), ("model", "resnet18", None, None)}
    expected |= {("analysis", "resnet18", w, m) for w in (0, 1) for m in ("two-pass", "none")}
    assert keys == expected
    assert len(rows) == len(expected)
    assert [(e["model"], e["selectivity"]) for e in payload["extrapolation"]] == [("resnet18", "two-pass"),
                                                                                 ("resnet18", "none")]
    assert all(e["hours"] > 0 and "extrapolation" in e["kind"] for e in payload["extrapolation"])
    assert payload["environment"]["device_name"]


def test_the_analysis_counts_the_files_written(run):
    data, out, _ = run
    files = list(data.rglob("*.jpg"))  # the independent count: what is on disk
    assert len(files) == IMAGES
    rows = json.loads(out.read_text())["results"]
    for r in (r for r in rows if r["stage"] == "analysis"):
        assert r["num_images"] == len(files), r
        assert r["passes"] == (2 if r["selectivity"] == "two-pass" else 1)
    for r in (r for r in rows if r["stage"] == "decode"):
        assert r["images"] == len(files), r


def test_gpu_decoding_is_skipped_cleanly_without_cuda(run):
    _, out, _ = run
    payload = json.loads(out.read_text())
    if payload["config"]["decoders"] == ["cpu"]:
        assert any("GPU decoding skipped" in note for note in payload["notes"])
    else:
        assert {r["decoder"] for r in payload["results"] if r["stage"] == "analysis"} == {"cpu", "gpu"}


def test_markdown_table_and_cached_corpus(run):
    data, out, argv = run
    text = out.with_suffix(".md").read_text()
    assert "| resnet18 | cpu | 0 |" in text and "| resnet18 | cpu | 1 |" in text
    assert "Extrapolation" in text and "not measured" in text
    corpus = next(data.iterdir())
    assert pipeline.ensure_corpus(corpus, IMAGES, 3, 36, 48, 0)[0] == 0  # cached: nothing regenerated
