"""Choosing the torch device a command computes on (`--device {auto, cpu, cuda}`), and measuring
time and peak memory there honestly (CUDA work is asynchronous: timers synchronize)."""
from __future__ import annotations

import os
import resource
import time

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def choose_device(name: str):
    """auto: the first CUDA device when there is one, else the CPU. Asking for cuda without one is
    an error that names what is available, raised before any work."""
    import torch

    if name not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise ValueError(f"--device cuda was asked for, but no CUDA device is available (torch {torch.__version__} "
                         f"built with {built}; {os.cpu_count()} CPU cores are): use --device cpu or auto")
    return torch.device(name)


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    return f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load} (1/5/15 min)"


def timed(fn, device):
    """(fn(), seconds), synchronizing a CUDA device before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def peak_memory(device) -> str:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB -> GiB
    out = f"peak host memory {rss:.2f} GiB"
    if device.type == "cuda":
        out += f", peak {device} memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return out
