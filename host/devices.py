"""Choosing the torch device a command computes on (`--device {auto, cpu, cuda}`), and measuring
time and peak memory there honestly (CUDA work is asynchronous: timers synchronize)."""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

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


def host_memory_available() -> int:
    """Bytes of host memory available now (Linux MemAvailable; else the physical total)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(folder, device=None) -> int:
    """A local checkpoint must fit in host memory in float32 (the study's MoE blocks live there,
    and accelerate offloads the layers a GPU cannot hold to it): else a clear error, before any
    tensor is read. Returns the bytes needed."""
    from ndpmoe.model.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    params = sum(_numel(t.shape) for t in ckpt.tensors.values())
    need = 4 * params
    have = host_memory_available()
    if need > have:
        gpu = ""
        if device is not None and getattr(device, "type", "") == "cuda":
            import torch
            gpu = f" (and {torch.cuda.mem_get_info(device)[0] / 1e9:.1f} GB free on {device}, which holds only what runs there)"
        raise ValueError(f"{folder}: {params / 1e9:.2f}B parameters need {need / 1e9:.1f} GB in float32, but this machine "
                         f"has {have / 1e9:.1f} GB of host memory available{gpu}; use fewer --layers or a larger machine")
    return need


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@contextmanager
def placed(model, device, log=print):
    """The model's own modules (embeddings, attention, norms, head) on `device` for the duration,
    with accelerate's device map keeping in host memory the layers the device cannot hold; the
    project's MoE blocks keep computing where their tensors are (the host), their inputs and
    outputs moved across. Nothing to do on the CPU."""
    if device.type == "cpu":
        yield model
        return
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    from ndpmoe.model.block import MoEBlock

    free, _ = torch.cuda.mem_get_info(device)
    layer_class = type(model.model.layers[0]).__name__
    device_map = infer_auto_device_map(model, max_memory={device.index or 0: int(0.85 * free),
                                                          "cpu": host_memory_available()},
                                       no_split_module_classes=[layer_class])
    on_host = sorted({k for k, v in device_map.items() if v == "cpu"})
    log(f"model on {device}" + (f"; {len(on_host)} modules kept in host memory (accelerate offload)" if on_host else ""))
    dispatch_model(model, device_map=device_map)
    origin: dict[int, object] = {}                     # id(MoE block) -> device its input came from

    def to_host(module, args):
        if isinstance(module, MoEBlock) and args and args[0].device.type != "cpu":
            origin[id(module)] = args[0].device
            return (args[0].cpu(),) + tuple(args[1:])

    def back(module, args, out):
        if isinstance(module, MoEBlock) and id(module) in origin:
            return out.to(origin.pop(id(module)))

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(to_host),
             torch.nn.modules.module.register_module_forward_hook(back)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
