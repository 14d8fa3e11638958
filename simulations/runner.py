"""Run the fedliver Flower app as a local simulation, through the real `flwr run`.

It starts its own `flower-superlink --simulation` on free loopback ports with `FLWR_HOME` inside
the run folder (runtime dependency installation off), submits the app with `flwr run`, streams
its log, checks the run's final status with `flwr ls`, and always stops the SuperLink and
everything it spawned (Ray included), also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.process import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedliver-sim"


@dataclass(frozen=True)
class SimulationSpec:
    run_dir: Path
    run_config: Mapping[str, object]
    num_supernodes: int
    cpus_per_node: int = 2
    app_dir: Path = REPO_ROOT
    timeout_s: float = 3600.0
    env: Mapping[str, str] = field(default_factory=dict)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _bin(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Flower starts flower-superexec (and the apps) by bare name: this environment's bin comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_DEDUP_LOGS="0",
        OMP_WAIT_POLICY="PASSIVE",  # busy-waiting OpenMP threads starve each other on shared cores
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, port: int, spec: SimulationSpec) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"  # loopback-only simulation SuperLink; deployment is TLS-only (deploy/)
        f"options.num-supernodes = {spec.num_supernodes}\n"
        f"options.backend.client-resources.num-cpus = {spec.cpus_per_node}\n"
        "options.backend.client-resources.num-gpus = 0\n"
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
            _bin("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(run_dir / "superlink_state.db"),
        ],
        log_path, env=env, cwd=run_dir,
    )
    try:
        superlink.start().wait_for_port("127.0.0.1", port, timeout=60)
        run_config = " ".join(f"{key}={toml_value(value)}" for key, value in spec.run_config.items())
        submitted = subprocess.run(
            [_bin("flwr"), "run", str(spec.app_dir), CONNECTION, "--run-config", run_config, "--format", "json"],
            cwd=run_dir, env=env, capture_output=True, text=True, timeout=300,
        )
        run_id = _run_id(submitted)
        streamed = subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], cwd=run_dir, env=env)
        status = _wait_for_run(run_id, run_dir, env, spec.timeout_s, superlink)
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


def _run_id(result: subprocess.CompletedProcess) -> int:
    try:
        payload = json.loads(result.stdout)
        return int(payload["run-id"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"flwr run failed (exit {result.returncode}): {result.stdout.strip()} {result.stderr.strip()}")


def _wait_for_run(run_id: int, run_dir: Path, env: Mapping[str, str], timeout: float, superlink: ManagedProcess) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        superlink.tree()  # remember every process it spawned, so that stop() finds them all
        if not superlink.running:
            return f"superlink exited with status {superlink.poll()}"
        listed = subprocess.run(
            [_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            cwd=run_dir, env=dict(env), capture_output=True, text=True, timeout=60,
        )
        status = _status(listed.stdout)
        if status.startswith("finished"):
            return status
        time.sleep(15)  # each `flwr ls` costs about 2 s of CPU: poll rarely
    return f"timed out after {timeout:.0f}s"


def _status(text: str) -> str:
    try:
        runs = json.loads(text).get("runs", [])
    except ValueError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""
