"""The GPU side of execution: a torch device holding cached expert data, with transfers.

On CUDA, host tensors are pinned and copied with non_blocking=True on a side stream, and the
compute stream waits on that stream before using them, so copies overlap compute. On the CPU (this
project's CI) the same calls are plain tensor moves; the CUDA path is exercised by tests marked
`gpu`, skipped without a device.

Simplification, stated: a real low-bit GEMM kernel would consume the packed image on the GPU. Here
the packed image is what the plan counts on the link, and the backend unpacks and dequantizes it
on the host before the upload, because the packing code is written for CPU tensors.
"""
from __future__ import annotations

from collections import Counter

import torch


class TorchGpuBackend:
    """Device-resident tensors keyed like the cache: (layer, expert, kind) -> {name: tensor}."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(self.device)!r} requested but CUDA is not available")
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: dict[tuple, dict[str, torch.Tensor]] = {}
        self.moved_bytes = Counter()           # bytes the plan counts, by link kind

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device tensor (pinned, non-blocking, side stream on CUDA)."""
        if self.copy_stream is None:
            return host.to(self.device)
        pinned = host.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            dev = pinned.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        dev.record_stream(compute)
        return dev

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        return x.to("cpu")

    def put(self, key: tuple, tensors: dict[str, torch.Tensor], link_kind: str, link_bytes: int) -> dict[str, torch.Tensor]:
        """Upload tensors under `key` (merging with what is there), counting `link_bytes`."""
        held = self.resident.setdefault(key, {})
        for name, t in tensors.items():
            held[name] = self.upload(t)
        self.moved_bytes[link_kind] += link_bytes
        return held

    def adopt(self, key: tuple, tensors: dict[str, torch.Tensor], link_kind: str, link_bytes: int
              ) -> dict[str, torch.Tensor]:
        """Hold tensors already on the device (staged by the next-layer prefetch) under `key`,
        counting the `link_bytes` they moved."""
        held = self.resident.setdefault(key, {})
        held.update(tensors)
        self.moved_bytes[link_kind] += link_bytes
        return held

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        return self.resident.get(key)

    def keep_only(self, keys: set) -> None:
        """Drop everything the cache no longer holds."""
        for key in [k for k in self.resident if k not in keys]:
            del self.resident[key]
