"""Where the time of a whole-corpus analysis goes: JPEG decoding, the model, the statistics.

    python benchmarks/bench_image_pipeline.py [--quick] [--data-dir DIR] [--images 3000]
        [--models resnet18,mobilenet_v2] [--input-size 160] [--batch 32] [--workers 0,2]
        [--selectivity two-pass,none] [--repeats 2] [--threads 2] [--device cpu|cuda] [--gpu-decode auto|on|off]

Builds (once, cached under --data-dir) an ImageFolder of generated JPEGs: smooth multi-octave
noise with a per-class tint, random sizes between --min-px and --max-px, a few classes. Then, for
each --workers count and each torchvision model (random init: speed does not depend on the
weights), it reports images/s of

  decode        iterating the DataLoader alone: file read + PIL decode + Resize + CenterCrop +
                ToTensor + Normalize (sparsekern's ImageFolder eval transform, the one
                `sparsekern analyze --data imagefolder:DIR` uses), collated channels_last,
                pinned when the device is CUDA; persistent workers when workers > 0
  model         the model alone: eval forward under inference_mode on pre-decoded channels_last
                batches already on the device (interleaved timer, median of rounds)
  analysis      sparsekern.analyze(model, loader, selectivity=...) over the whole corpus, one
                timed run per mode; "images/s" counts every image of every pass (two-pass reads
                the corpus twice), "corpus images/s" counts each image once

Every stage is measured --repeats times (default 2; --quick 1), all stages in turn per repeat,
so that a change in the machine's load (other jobs on a shared box) hits every stage alike; rows
report the median over the repeats (all values are in the JSON). And, from the best worker
count, an extrapolated time for an ImageNet-sized corpus (1.28M images) on this machine per
selectivity mode. With a CUDA device and --gpu-decode auto|on, also
the same with the JPEGs decoded on the GPU (torchvision.io.decode_jpeg(..., device="cuda"),
resize / crop / normalise there); without CUDA that part is skipped, saying so.

--quick: 256 images, resnet18 only, one repeat (about a minute on 2 idle CPU threads). Writes
JSON (device, versions, date, config, rows) and a markdown table to
benchmarks/results/image_pipeline-*.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

import sparsekern.bench as bench
from sparsekern.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_image_folder
from sparsekern.stats.analyze import analyze

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET_IMAGES = 1_281_167
DEFAULT_DATA_DIR = Path.home() / ".cache" / "sparsekern" / "bench_image_pipeline"
CROP_PCT = 0.875  # Resize(floor(size / 0.875)) -> CenterCrop(size), as load_data does


# ----------------------------------------------------------------------------- the corpus

def corpus_dir(data_dir: Path, images: int, classes: int, min_px: int, max_px: int, seed: int) -> Path:
    """The folder of one corpus configuration (so a different --images never mixes corpora)."""
    return Path(data_dir).expanduser() / f"n{images}-c{classes}-px{min_px}-{max_px}-s{seed}"


def smooth_noise_image(index: int, classes: int, min_px: int, max_px: int, seed: int):
    """One natural-looking-ish RGB PIL image: octaves of upsampled noise (1/f-like), a class tint."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((3, 1.0), (9, 0.5), (27, 0.25), (81, 0.12)):
        small = rng.random((max(2, cells * height // max_px), max(2, cells * width // max_px), 3), dtype=np.float32)
        up = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        canvas += weight * (np.asarray(up, dtype=np.float32) / 255.0 - 0.5)
    canvas += 0.03 * rng.standard_normal((height, width, 3), dtype=np.float32)  # sensor-like grain
    tint = np.array([(index % classes) / max(classes - 1, 1), 0.5, 1 - (index % classes) / max(classes - 1, 1)],
                    dtype=np.float32)
    canvas = 0.5 + canvas / 1.9 + 0.25 * (tint - 0.5)
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")


def ensure_corpus(root: Path, images: int, classes: int, min_px: int, max_px: int, seed: int,
                  quality: int = 90) -> tuple[int, float]:
    """Write the JPEGs of ``root`` that are missing (each is a function of its index, so a partly
    written corpus is completed, not redone). Returns (files generated now, seconds spent)."""
    start, made = time.perf_counter(), 0
    for k in range(classes):
        (root / f"class{k:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = root / f"class{i % classes:02d}" / f"img{i:06d}.jpg"
        if path.is_file() and path.stat().st_size > 0:
            continue
        tmp = path.with_suffix(".tmp")
        smooth_noise_image(i, classes, min_px, max_px, seed).save(tmp, "JPEG", quality=quality)
        tmp.replace(path)
        made += 1
    return made, time.perf_counter() - start


def count_jpegs(root: Path) -> int:
    return sum(1 for _ in Path(root).rglob("*.jpg"))


# ----------------------------------------------------------------------------- loaders

def collate_channels_last(batch):
    """default_collate, the images channels_last (what the channels_last model wants)."""
    x, y = default_collate(batch)
    return x.contiguous(memory_format=torch.channels_last), y


def cpu_loader(dataset, batch: int, workers: int, pin: bool) -> DataLoader:
    """The loader a user would give analyze: in order (two-pass needs the same batches twice)."""
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, pin_memory=pin,
                      collate_fn=collate_channels_last, persistent_workers=workers > 0)


class JpegBytes(Dataset):
    """The files of an ImageFolder as undecoded bytes (uint8 tensors), for decoding on the GPU."""

    def __init__(self, folder_dataset):
        self.samples = folder_dataset.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        from torchvision.io import read_file

        path, label = self.samples[index]
        return read_file(path), label


def collate_bytes(batch):
    return [b for b, _ in batch], torch.tensor([label for _, label in batch])


class GpuDecodedLoader:
    """Batches of JPEG bytes from a DataLoader, decoded on a CUDA device with nvJPEG
    (torchvision.io.decode_jpeg(list, device=...)), then resized (shorter side, antialiased),
    center-cropped, scaled and normalised there, channels_last. Iterable more than once (two-pass);
    exposes the inner loader's sampler and batch size for analyze's bookkeeping."""

    def __init__(self, loader: DataLoader, device: torch.device, size: int, resize: int):
        self.loader, self.device, self.size, self.resize = loader, device, size, resize
        self.sampler, self.batch_size = loader.sampler, loader.batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as TF

        for data, labels in self.loader:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            crops = [TF.center_crop(TF.resize(img, self.resize, antialias=True), [self.size, self.size])
                     for img in decoded]
            x = torch.stack(crops).float().div_(255).sub_(self.mean).div_(self.std)
            yield x.contiguous(memory_format=torch.channels_last), labels


# ----------------------------------------------------------------------------- measurements

def time_decode(loader, device: torch.device) -> tuple[int, float]:
    """(images, seconds) of one full iteration of ``loader`` (worker start-up included)."""
    bench.synchronize(device)
    start, images = time.perf_counter(), 0
    for x, _ in loader:
        images += x.shape[0]
    bench.synchronize(device)
    return images, time.perf_counter() - start


def build_models(names, device: torch.device) -> dict[str, nn.Module]:
    import torchvision

    models = {}
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        models[name] = model.eval().to(device, memory_format=torch.channels_last)
    return models


def time_models_alone(models, batches, device, rounds: int) -> dict[str, dict]:
    """Plain eval forward of each model over the pre-decoded ``batches`` (cycled), interleaved."""
    def candidate(model):
        state = {"i": 0}

        def forward():
            x = batches[state["i"] % len(batches)]
            state["i"] += 1
            return model(x)
        return forward

    with torch.inference_mode():
        return bench.interleaved_timer({name: candidate(m) for name, m in models.items()}, device=device,
                                       rounds=rounds, min_round_s=0.3, warmup=1)


def hours(images: int, rate: float) -> float:
    return images / rate / 3600 if rate > 0 else float("inf")


# ----------------------------------------------------------------------------- reporting

def markdown(config: dict, env: dict, rows: list[dict], extrapolation: list[dict], command: str, notes) -> str:
    modes = config["selectivity"]
    decode = {(r["workers"], r["decoder"]): r for r in rows if r["stage"] == "decode"}
    model = {r["model"]: r for r in rows if r["stage"] == "model"}
    analysis = {(r["model"], r["workers"], r["decoder"], r["selectivity"]): r for r in rows if r["stage"] == "analysis"}
    header = ["model", "decoder", "workers", "decode img/s", "model img/s"]
    header += [f"analysis {m} img/s (corpus img/s)" if m == "two-pass" else f"analysis {m} img/s" for m in modes]
    lines = [
        f"Image pipeline, {config['images']} generated JPEGs ({config['min_px']}-{config['max_px']} px, "
        f"{config['classes']} classes) -> {config['input_size']}x{config['input_size']}, batch {config['batch']}, "
        f"channels_last, {env['device_name']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
        f"{env['date'][:10]}.",
        "",
        f"`{command}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    keys = sorted({(k[0], k[1], k[2]) for k in analysis}, key=lambda k: (config["models"].index(k[0]), k[2], k[1]))
    for name, workers, decoder in keys:
        cells = [name, decoder, str(workers), f"{decode[(workers, decoder)]['images_per_s']:.0f}",
                 f"{model[name]['images_per_s']:.0f}"]
        for m in modes:
            r = analysis.get((name, workers, decoder, m))
            if r is None:
                cells.append("")
            elif r["passes"] > 1:
                cells.append(f"{r['images_per_s']:.0f} ({r['corpus_images_per_s']:.0f})")
            else:
                cells.append(f"{r['images_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "decode: the DataLoader alone (read + decode + resize + crop + normalise); model: eval forward "
              "on pre-decoded batches; analysis: `sparsekern.analyze` over the corpus (images/s counts every "
              "pass, corpus img/s each image once); each cell the median of "
              f"{config['repeats']} repeat(s), all stages measured in turn per repeat."]
    if extrapolation:
        lines += ["", f"**Extrapolation** (not measured): an ImageNet-sized corpus ({IMAGENET_IMAGES:,} images) "
                  "at the best measured corpus rate of this run, on this machine:", ""]
        for e in extrapolation:
            lines.append(f"- {e['model']}, selectivity {e['selectivity']} ({e['decoder']} decode, {e['workers']} "
                         f"workers, {e['corpus_images_per_s']:.0f} corpus img/s): about {e['hours']:.1f} h")
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images, resnet18 only (unless given explicitly)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where the generated corpus is cached")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default 3000; --quick 256)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--min-px", type=int, default=160, help="smallest generated side")
    parser.add_argument("--max-px", type=int, default=256, help="largest generated side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=None, help="torchvision models (default resnet18,mobilenet_v2; --quick resnet18)")
    parser.add_argument("--input-size", type=int, default=160, help="center crop fed to the model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    parser.add_argument("--selectivity", default="two-pass,none", help="analyze selectivity modes")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the model-alone timer (default 7; --quick 5)")
    parser.add_argument("--model-batches", type=int, default=4, help="pre-decoded batches the model-alone timing cycles")
    parser.add_argument("--repeats", type=int, default=None,
                        help="times every stage is measured, in turn (median reported; default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-decode", choices=("auto", "on", "off"), default="auto",
                        help="also decode the JPEGs on the GPU (nvJPEG); skipped without a CUDA device")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/image_pipeline-...)")
    parser.add_argument("--markdown", default=None, help="markdown path (default: the JSON path with .md)")
    args = parser.parse_args(argv)
    images = args.images if args.images is not None else (256 if args.quick else 3000)
    names = [m for m in (args.models or ("resnet18" if args.quick else "resnet18,mobilenet_v2")).split(",") if m]
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    modes = [m for m in args.selectivity.split(",") if m]
    rounds = args.rounds or (5 if args.quick else 7)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    if images < 1 or args.batch < 1 or args.repeats < 1 or not names or not workers_list or not modes:
        parser.error("--images, --batch, --models, --workers and --selectivity must be non-empty / positive")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pin = device.type == "cuda"
    notes = []

    gpu_decode = args.gpu_decode != "off" and device.type == "cuda"
    if args.gpu_decode == "on" and not gpu_decode:
        notes.append(f"GPU decoding skipped: --device {device} is not a CUDA device"
                     + ("" if torch.cuda.is_available() else " (no CUDA device here)") + ".")
        print(notes[-1])

    root = corpus_dir(Path(args.data_dir), images, args.classes, args.min_px, args.max_px, args.seed)
    made, gen_s = ensure_corpus(root, images, args.classes, args.min_px, args.max_px, args.seed)
    files = count_jpegs(root)
    print(f"corpus {root}: {files} JPEGs" + (f" ({made} generated in {gen_s:.1f} s)" if made else " (cached)"))
    resize = math.floor(args.input_size / CROP_PCT)
    dataset = load_image_folder(root, train=False, image_size=args.input_size, resize_size=resize)
    if len(dataset) != images:
        raise RuntimeError(f"{root} holds {len(dataset)} images, expected {images}: remove it to regenerate")

    decoders = ["cpu"] + (["gpu"] if gpu_decode else [])

    def make_loader(decoder: str, workers: int):
        if decoder == "cpu":
            return cpu_loader(dataset, args.batch, workers, pin)
        inner = DataLoader(JpegBytes(dataset), batch_size=args.batch, shuffle=False, num_workers=workers,
                           collate_fn=collate_bytes, persistent_workers=workers > 0)
        return GpuDecodedLoader(inner, device, args.input_size, resize)

    # Read every file once, untimed, so the first decode stage measured does not also pay for a cold
    # page cache (it did: decode alone at 19 images/s with 0 workers, while the analysis with 0 workers,
    # decoding the same files later, ran at 116).
    for path in sorted(Path(root).rglob("*.jpg")):
        path.read_bytes()
    # Pre-decoded batches for the model-alone timing; decoding them also warms up the transforms.
    batches = []
    for x, _ in cpu_loader(dataset, args.batch, 0, False):
        batches.append(x.to(device).contiguous(memory_format=torch.channels_last))
        if len(batches) == args.model_batches:
            break
    load_before = os.getloadavg()
    models = build_models(names, device)
    # Untimed one-batch analysis per model and mode: the first call pays one-time costs (backend
    # loading, kernel selection, first allocations).
    for name, model in models.items():
        for mode in modes:
            analyze(copy.deepcopy(model), batches[:1], device=device, selectivity=mode, progress=False)
    mean_batch = sum(b.shape[0] for b in batches) / len(batches)

    def decode_task(decoder, workers):
        def task():
            n, s = time_decode(make_loader(decoder, workers), device)
            return [{"stage": "decode", "decoder": decoder, "workers": workers, "model": None,
                     "images": n, "seconds": s, "images_per_s": n / s}]
        return task

    def model_task():
        return [{"stage": "model", "decoder": None, "workers": None, "model": name, "batch": mean_batch,
                 **bench.milliseconds(t), "seconds": t["median_s"], "images_per_s": mean_batch / t["median_s"]}
                for name, t in time_models_alone(models, batches, device, rounds).items()]

    def analysis_task(name, decoder, workers, mode):
        def task():
            result = analyze(copy.deepcopy(models[name]), make_loader(decoder, workers), device=device,
                             selectivity=mode, progress=False)
            return [{"stage": "analysis", "decoder": decoder, "workers": workers, "model": name,
                     "selectivity": mode, "num_images": result.num_images, "passes": result.passes,
                     "seconds": result.seconds, "images_per_s": result.images_per_second,
                     "corpus_images_per_s": result.num_images / result.seconds}]
        return task

    # (1) decoding + transforms alone, (2) the model alone on pre-decoded batches already on the
    # device, (3) the full analysis: all of them once per repeat, in turn, so that a change in the
    # machine's load hits every stage alike; each row reports the median over the repeats.
    tasks = [decode_task(d, w) for d in decoders for w in workers_list] + [model_task]
    tasks += [analysis_task(n, d, w, m) for n in names for d in decoders for w in workers_list for m in modes]
    samples: dict[tuple, list[dict]] = {}
    for repeat in range(args.repeats):
        for task in tasks:
            for row in task():
                key = (row["stage"], row["model"], row["decoder"], row["workers"], row.get("selectivity"))
                samples.setdefault(key, []).append(row)
                print(f"[{repeat + 1}/{args.repeats}] {' '.join(str(k) for k in key if k is not None)}: "
                      f"{row['images_per_s']:.1f} img/s")
    rows = []
    for runs in samples.values():
        ordered = sorted(runs, key=lambda r: r["images_per_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the median run (the slower middle one of an even count)
        row["images_per_s"] = statistics.median(r["images_per_s"] for r in runs)
        row["seconds"] = statistics.median(r["seconds"] for r in runs)
        if "corpus_images_per_s" in row:
            row["corpus_images_per_s"] = statistics.median(r["corpus_images_per_s"] for r in runs)
        row["images_per_s_repeats"] = [r["images_per_s"] for r in runs]
        row["repeats"] = len(runs)
        rows.append(row)

    extrapolation = []
    for name in names:
        for mode in modes:
            best = max((r for r in rows if r["stage"] == "analysis" and r["model"] == name
                        and r["selectivity"] == mode), key=lambda r: r["corpus_images_per_s"])
            extrapolation.append({"model": name, "selectivity": mode, "decoder": best["decoder"],
                                  "workers": best["workers"], "corpus_images_per_s": best["corpus_images_per_s"],
                                  "images": IMAGENET_IMAGES, "hours": hours(IMAGENET_IMAGES, best["corpus_images_per_s"]),
                                  "kind": "extrapolation, not measured"})

    env = bench.timing_environment(device)
    # The 1-minute load average before and after: other processes on a shared machine slow every stage.
    env["loadavg_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    command = "python benchmarks/bench_image_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    config = {"images": images, "files_on_disk": files, "classes": args.classes, "min_px": args.min_px,
              "max_px": args.max_px, "seed": args.seed, "models": names, "weights": "random init (seed 0)",
              "input_size": args.input_size, "resize": resize, "batch": args.batch, "workers": workers_list,
              "selectivity": modes, "threads": torch.get_num_threads(), "channels_last": True,
              "pin_memory": pin, "persistent_workers": "when workers > 0", "decoders": decoders,
              "model_rounds": rounds, "repeats": args.repeats, "quick": args.quick, "command": command, "corpus_dir": str(root)}
    columns = ["stage", "model", "decoder", "workers", "selectivity", "images_per_s", "corpus_images_per_s", "seconds"]
    bench.print_table(rows, columns)
    for e in extrapolation:
        print(f"extrapolation (not measured): {e['model']} selectivity={e['selectivity']}: {e['images']:,} images "
              f"at {e['corpus_images_per_s']:.0f} img/s -> {e['hours']:.1f} h")
    stem = f"image_pipeline{'-quick' if args.quick else ''}-{torch.get_num_threads()}threads"
    payload = {"benchmark": "image_pipeline", "config": config, "environment": env, "results": rows,
               "extrapolation": extrapolation, "notes": notes}
    path = bench.write_json(stem, payload, args.json, directory=RESULTS)
    md_path = Path(args.markdown) if args.markdown else path.with_suffix(".md")
    md_path.write_text(markdown(config, env, rows, extrapolation, command, notes))
    print(f"wrote {path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()
