"""Run the fedliver Flower app as a local simulation, through the real `flwr run`.

It starts its own `flower-superlink --simulation` on free loopback ports with `FLWR_HOME` inside
the run folder (runtime dependency installation off), submits the app with `flwr run`, streams
its log, checks the run's final status with `flwr ls`, and always stops the SuperLink and
everything it spawned (Ray included), also on failure or Ctrl-C.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.launch import CONNECTION_NAME, QUIET_ENV, LaunchError, flower_executable, submit_run, wait_for_run
from deploy.process import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SimulationSpec:
    run_dir: Path
    run_config: Mapping[str, str | int | float | bool]
    num_supernodes: int
    cpus_per_node: int = 2
    gpus_per_node: float | None = None  # Ray GPUs per ClientApp actor (None: `auto_gpus_per_node`)
    app_dir: Path = REPO_ROOT
    timeout_s: float = 3600.0
    env: Mapping[str, str] = field(default_factory=dict)


def auto_gpus_per_node(num_supernodes: int, gpu_count: int | None = None) -> float:
    """0 without a CUDA GPU; else 1 / (nodes per GPU), so that every node runs at once on a
    GPU of its own or a share of one (4 nodes on 1 GPU: 0.25; on 3 GPUs: 0.5, as an actor's share
    must fit on one GPU; on 4 or more: 1.0). Rounded down to Ray's 1e-4 resolution so that the
    shares never add up to more than a GPU."""
    if gpu_count is None:
        from common.device import cuda_device_count

        gpu_count = cuda_device_count()
    if gpu_count <= 0:
        return 0.0
    per_gpu = math.ceil(max(1, num_supernodes) / gpu_count)
    return math.floor(10_000 / per_gpu) / 10_000


def gpus_per_node(spec: SimulationSpec) -> float:
    """What each actor asks Ray for: the spec's value, or `auto_gpus_per_node`. Ray hides the GPUs
    from actors that ask for none, so a site's `device = "auto"` then trains on the CPU."""
    value = auto_gpus_per_node(spec.num_supernodes) if spec.gpus_per_node is None else float(spec.gpus_per_node)
    if value < 0 or (value > 1 and not value.is_integer()):
        raise ValueError(f"gpus per node must be >= 0 and a whole number above 1 (Ray), got {value}")
    return value


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Flower starts flower-superexec (and the apps) by bare name: this environment's bin comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        QUIET_ENV,
        FLWR_HOME=str(flwr_home),
        RAY_DEDUP_LOGS="0",
        OMP_WAIT_POLICY="PASSIVE",  # busy-waiting OpenMP threads starve each other on shared cores
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, port: int, spec: SimulationSpec) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"  # loopback-only simulation SuperLink; deployment is TLS-only (deploy/)
        f"options.num-supernodes = {spec.num_supernodes}\n"
        f"options.backend.client-resources.num-cpus = {spec.cpus_per_node}\n"
        f"options.backend.client-resources.num-gpus = {gpus_per_node(spec)}\n"
    )


def run_simulation(spec: SimulationSpec) -> int:
    """Run the app to completion; returns the run id. Raises if the run did not complete."""
    run_dir = spec.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr_home"
    port = free_port()
    write_connection(flwr_home, port, spec)
    env = flower_env(flwr_home, spec.env)
    log_path = run_dir / "superlink.log"
    superlink = ManagedProcess(
        "flower-superlink",
        [
            flower_executable("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(run_dir / "superlink_state.db"),
        ],
        log_path, env=env, cwd=run_dir,
    )
    try:
        superlink.start().wait_for_port("127.0.0.1", port, timeout=60)
        submitted_at = time.time()
        try:  # simulation keeps pyproject's run config defaults: no deployment overrides
            run_id = submit_run(spec.app_dir, flwr_home, spec.run_config, defaults={})
        except LaunchError as error:
            raise RuntimeError(str(error)) from error
        streamed = subprocess.Popen(
            [flower_executable("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"], cwd=run_dir, env=env)
        # `flwr ls` costs ~2 s of CPU: ask every 15 s, and every second once this run wrote its report.
        status = wait_for_run(run_id, flwr_home, timeout=spec.timeout_s, status_every=15.0, watch=[superlink],
                              ready=_written_since(run_dir / "report.json", submitted_at))
        try:  # let the log stream print its last lines
            streamed.wait(timeout=15)
        except subprocess.TimeoutExpired:
            streamed.terminate()
            streamed.wait()
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ended as {status!r}; logs: {log_path} and the output above")
        return run_id
    finally:
        superlink.stop(timeout=10)


def _written_since(path: Path, since: float) -> Callable[[], bool]:
    """True once `path` exists and was written after `since` (a resumed run's old report does not count)."""
    return lambda: path.is_file() and path.stat().st_mtime >= since
