"""Where independent pieces of work run: in this process, on a local Ray runtime of N workers,
or on an existing Ray cluster (`--workers N`, `--ray-address HOST:PORT`). Shared by the study's
per-layer work (host/study_workers.py) and the FPGA sweep's points (rtl/synth/sweep_workers.py);
infrastructure, like paths.py, so both packages may import it.

A Ray address that does not answer is refused before any work, naming what was tried; a task
whose worker dies is retried by Ray (max_retries), which is safe because every task writes its
result atomically under a key of its inputs.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

TASK_RETRIES = 3


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, not {workers!r}")
    return workers


def check_address(address: str, timeout: float = 3.0) -> tuple[str, int]:
    """HOST:PORT of a running Ray head (its GCS port, 6379 by default), reachable now."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://"):
        raise ValueError(f"Ray address {address!r}: give the head's HOST:PORT (the GCS address `ray start --head` "
                         f"prints), not a Ray Client ray:// URL")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"Ray address {address!r} does not answer ({exc.strerror or exc}); is `ray start --head` "
                         f"running there, and is port {port} open?") from None
    return host, int(port)


def check_spread(workers, address: str | None) -> None:
    """What `--workers` / `--ray-address` ask for, checked before any work: 0 / None run here."""
    if workers:
        check_workers(workers)
    if address:
        check_address(address)


@contextmanager
def ray_runtime(workers: int, address: str | None = None):
    """A Ray runtime for the duration: joined at `address`, else started locally with `workers`
    CPUs. Yields the cluster's resources (CPU, GPU counts)."""
    check_workers(workers)
    if address:
        check_address(address)
    try:
        import ray
    except ImportError:
        raise ValueError("--workers / --ray-address need Ray: pip install ray==2.60.0") from None
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers, **kwargs)
    try:
        yield dict(ray.cluster_resources())
    finally:
        if started:
            ray.shutdown()


def task_options(resources: dict) -> dict:
    """One CPU per task, and a GPU when the cluster has them."""
    return {"num_cpus": 1, "num_gpus": 1 if resources.get("GPU", 0) >= 1 else 0, "max_retries": TASK_RETRIES}


def run_tasks(fn, calls: list[tuple], resources: dict) -> list:
    """fn(*args) for every args tuple of `calls` as Ray tasks; results in the order of `calls`."""
    import ray

    remote = ray.remote(**task_options(resources))(fn)
    return ray.get([remote.remote(*args) for args in calls])
