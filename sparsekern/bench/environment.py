"""Where a measurement ran: the device's name, versions, threads and date, recorded with every
speed result (``sparsekern bench``) and every benchmark JSON."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from sparsekern._backend import backends


def device_name(device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def timing_environment(device) -> dict:
    """Date, device name, host, CPU count, torch threads, versions (Python, torch, Triton,
    sparsekern) and the available backends."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Triton's version from its metadata: importing it would cost seconds for a label.
        "triton": _version("triton"),
        "sparsekern": _version("sparsekern"),
        "backends": backends(),
    }
