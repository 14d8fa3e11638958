"""SuperLink / SuperNode / registration commands for a TLS + node-authenticated federation.

The builders are pure: they turn a config dataclass into a `Command` (argv, extra environment,
working folder) and touch no file, so the CLI (`fedliver superlink|supernode|register`), the
compose files and the loopback tests all run the very same flags. `ProcessGroup` starts such
commands in the background and guarantees that every process it started is stopped.
`submit_run` / `wait_for_run` start a run with `flwr run` (deployment defaults:
`DEPLOYMENT_RUN_CONFIG`, float16 transport) and wait for its final status.

State folders (one per SuperLink, one per SuperNode):

    <superlink state>/state.db        runs and registered nodes (--database)
    <superlink state>/superlink-home  FLWR_HOME of the SuperLink (and its ServerApp)
    <superlink state>/cli-home        FLWR_HOME of the operator's `flwr` CLI: config.toml with the
                                      TLS connection named "fedliver"
    <supernode state>/flwr-home       FLWR_HOME of the SuperNode (and its ClientApps)
    <supernode state>/cache           default cache-dir handed to the ClientApp
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic_write import atomic_write_text
from deploy.certs import CertLayout
from deploy.process import ManagedProcess, ProcessError

CONNECTION_NAME = "fedliver"
ROLES = ("train", "eval")
# No network calls home, no `uv sync` of app dependencies at run time (it would fetch a CUDA torch):
# the environment that runs `fedliver` already holds every dependency.
QUIET_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
# `--database` value for Flower's in-memory state (no SQLite file).
IN_MEMORY_DATABASE = ":flwr-in-memory:"
# Flags the wrappers own: passing them again through --extra would contradict the setup.
_FORBIDDEN_EXTRA = ("--insecure", "--allow-runtime-dependency-installation")


class LaunchError(ValueError):
    """Bad launch input; the message is one line naming the file or option."""


@dataclass(frozen=True)
class Command:
    """A command line, the environment it needs on top of the caller's, and where it runs."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) + `env`; an absolute executable's folder goes first on PATH
        so that Flower's own helpers (flower-superexec, flwr-serverapp) come from the same install."""
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        exe = Path(self.argv[0])
        if exe.is_absolute():
            env["PATH"] = os.pathsep.join(p for p in (str(exe.parent), env.get("PATH", "")) if p)
        return env

    def shell(self) -> str:
        """The command as one copy-pasteable shell line."""
        parts = [f"cd {shlex.quote(str(self.cwd))} &&"] if self.cwd else []
        parts += [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(parts + [shlex.join(self.argv)])


def flower_executable(name: str, bin_dir: Path | None = None) -> str:
    """`name` from `bin_dir`, else from this interpreter's environment, else left to PATH."""
    folder = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
    candidate = folder / name
    return str(candidate) if bin_dir is not None or candidate.exists() else name


def _check_extra(extra: Sequence[str]) -> tuple[str, ...]:
    for arg in extra:
        if arg.split("=")[0] in _FORBIDDEN_EXTRA:
            raise LaunchError(f"extra argument {arg}: not allowed, this setup always uses TLS "
                              "and preinstalled dependencies")
    return tuple(extra)


def _abs(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


# ----------------------------------------------------------------------------- SuperLink
@dataclass(frozen=True)
class SuperLinkConfig:
    """The coordinator's SuperLink (it also runs the ServerApp: --isolation subprocess)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    state_dir: Path
    host: str = "127.0.0.1"             # 0.0.0.0 to serve other machines
    port: int = 8000                    # Fleet, Control and Runtime API share this port
    isolation: str = "subprocess"
    extra_args: tuple[str, ...] = ()
    # False: Flower's in-memory state instead of state.db. Nothing survives a restart (hospitals
    # must be registered again), but no SQLite lock waits either (see docs/deploy.md).
    persist_state: bool = True
    # True: `flower-superlink` as Flower ships it, whose state.db gives up on a lock after 5 s
    # (deploy/superlink_main.py); only for reproducing that (deploy/state_probe.py).
    flower_lock_wait: bool = False

    @classmethod
    def from_certs(cls, certs: Path, state_dir: Path, **kwargs: object) -> SuperLinkConfig:
        """`certs` is the output folder of `fedliver certs` or its `superlink/` folder."""
        folder = _abs(certs)
        if not (folder / "server.crt").exists() and (folder / "superlink").is_dir():
            folder = CertLayout(folder).superlink_dir
        return cls(folder / "ca.crt", folder / "server.crt", folder / "server.key",
                   _abs(state_dir), **kwargs)  # type: ignore[arg-type]

    @property
    def database(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "superlink-home"

    @property
    def cli_home(self) -> Path:
        return self.state_dir / "cli-home"

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.server_cert, self.server_key)


def superlink_command(config: SuperLinkConfig, bin_dir: Path | None = None,
                      executable: str | None = None) -> Command:
    argv = [
        executable or flower_executable("flower-superlink", bin_dir),
        "--ssl-ca-certfile", str(config.ca_cert),
        "--ssl-certfile", str(config.server_cert),
        "--ssl-keyfile", str(config.server_key),
        "--enable-supernode-auth",
        "--database", str(config.database) if config.persist_state else IN_MEMORY_DATABASE,
        "--disable-runtime-dependency-installation",
        "--isolation", config.isolation,
        "--host", config.host,
        "--port", str(config.port),
        *_check_extra(config.extra_args),
    ]
    env = {"FLWR_HOME": str(config.flwr_home), **QUIET_ENV}
    # The ServerApp runs in the SuperLink's working folder: keep it in the state folder.
    return Command(tuple(argv), env, config.state_dir)


def superlink_launch_command(config: SuperLinkConfig, bin_dir: Path | None = None) -> Command:
    """What `fedliver superlink` and `ProcessGroup` run: `superlink_command`'s flags, with state.db
    through `python -m deploy.superlink_main` (SQLite lock wait 60 s instead of Flower's 5 s,
    see that module); Flower's in-memory state needs no such wait and runs `flower-superlink`."""
    command = superlink_command(config, bin_dir)
    if not config.persist_state or config.flower_lock_wait:
        return command
    python = Path(bin_dir) / "python" if bin_dir is not None else Path(sys.executable)
    return Command((str(python), "-m", "deploy.superlink_main", *command.argv[1:]), command.env, command.cwd)


# ----------------------------------------------------------------------------- SuperNode
def node_config_string(values: Mapping[str, str | int | float | bool]) -> str:
    """`--node-config` text Flower parses back to `values` (strings quoted, as it requires)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            value = str(value)
            if "\n" in value or ('"' in value and "'" in value):
                raise LaunchError(f"node config {key}={value!r}: newlines or both quote kinds")
            # Backslashes or double quotes: a TOML literal string keeps them as they are.
            text = f"'{value}'" if ("\\" in value or '"' in value) else f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass(frozen=True)
class SuperNodeConfig:
    """One hospital's SuperNode."""

    site: str
    role: str                           # "train" or "eval"
    data_dir: Path
    superlink: str                      # HOST:PORT of the coordinator's SuperLink
    ca_cert: Path
    private_key: Path
    state_dir: Path
    port: int = 9094                    # local Runtime API; distinct per node on one host
    cache_dir: Path | None = None       # default: <state_dir>/cache
    host: str = "127.0.0.1"
    isolation: str = "subprocess"
    max_retries: int | None = None      # None: keep reconnecting (the SuperLink may restart)
    max_wait_time: float | None = None
    extra_args: tuple[str, ...] = ()
    device: str = ""                    # node config `device` (auto, cpu, cuda, cuda:N); "" = the run's

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise LaunchError(f"--role {self.role}: use one of {', '.join(ROLES)}")
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or "://" in self.superlink:
            raise LaunchError(f"--superlink {self.superlink}: give HOST:PORT, e.g. coordinator.example.org:8000")

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.state_dir / "cache"

    @property
    def node_config(self) -> dict[str, str]:
        """What the ClientApp reads from `context.node_config`."""
        return {"site": self.site, "role": self.role, "data-dir": str(_abs(self.data_dir)),
                "cache-dir": str(_abs(self.cache)), **({"device": self.device} if self.device else {})}

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.private_key)


def supernode_command(config: SuperNodeConfig, bin_dir: Path | None = None,
                      executable: str | None = None) -> Command:
    argv = [
        executable or flower_executable("flower-supernode", bin_dir),
        "--root-certificates", str(config.ca_cert),
        "--superlink", config.superlink,
        "--auth-supernode-private-key", str(config.private_key),
        "--node-config", node_config_string(config.node_config),
        "--isolation", config.isolation,
        "--host", config.host,
        "--port", str(config.port),
    ]
    if config.max_retries is not None:
        argv += ["--max-retries", str(config.max_retries)]
    if config.max_wait_time is not None:
        argv += ["--max-wait-time", str(config.max_wait_time)]
    argv += _check_extra(config.extra_args)
    # Runtime dependency installation is off by default on a SuperNode (no flag to pass); the
    # environment variable keeps it off should that default change.
    env = {"FLWR_HOME": str(config.flwr_home), **QUIET_ENV}
    return Command(tuple(argv), env, config.state_dir)


# ----------------------------------------------------------------------------- registration
def connection_toml(address: str, root_certificates: Path, name: str = CONNECTION_NAME) -> str:
    """`$FLWR_HOME/config.toml` text with one TLS connection, also the default."""
    q = lambda s: json.dumps(str(s))  # noqa: E731  (a JSON string is a valid TOML basic string)
    return (f"[superlink]\ndefault = {q(name)}\n\n[superlink.{name}]\n"
            f"address = {q(address)}\nroot-certificates = {q(root_certificates)}\n")


def write_connection_config(flwr_home: Path, address: str, root_certificates: Path,
                            name: str = CONNECTION_NAME) -> Path:
    """Create or update `flwr_home/config.toml` so that `flwr ... <name>` reaches the SuperLink's
    Control API over TLS; other connections in an existing file are kept."""
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        import tomli_w  # installed with flwr, which writes this file the same way

        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise LaunchError(f"{path}: not valid TOML ({err})") from err
        links = data.setdefault("superlink", {})
        links[name] = {"address": address, "root-certificates": str(root_certificates)}
        links.setdefault("default", name)
        atomic_write_text(path, tomli_w.dumps(data))
    else:
        atomic_write_text(path, connection_toml(address, root_certificates, name))
    return path


def register_command(public_key: Path, flwr_home: Path, *, node_name: str | None = None,
                     connection: str = CONNECTION_NAME, bin_dir: Path | None = None) -> Command:
    """`flwr supernode register KEY.pub <connection> --format json` under `flwr_home`."""
    argv = [flower_executable("flwr", bin_dir), "supernode", "register", str(public_key),
            connection, "--format", "json"]
    if node_name:
        argv += ["--name", node_name]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


def list_nodes_command(flwr_home: Path, connection: str = CONNECTION_NAME,
                       bin_dir: Path | None = None) -> Command:
    argv = [flower_executable("flwr", bin_dir), "supernode", "list", connection, "--format", "json"]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


@dataclass(frozen=True)
class Registration:
    site: str
    node_id: int | None                 # None when it failed or was registered before
    already: bool                       # the key was registered earlier (not an error)
    message: str


def _json_from(stdout: str) -> dict:
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def parse_register_output(site: str, stdout: str, stderr: str = "") -> Registration:
    """`flwr ... --format json` exits 0 even on failure: read the JSON it prints."""
    data = _json_from(stdout)
    if data.get("success"):
        return Registration(site, int(data["node-id"]), False, "registered")
    message = str(data.get("error-message") or stderr or stdout).strip()
    if "already in use" in message:
        return Registration(site, None, True, "already registered")
    return Registration(site, None, False, message.splitlines()[-1] if message else "failed")


def run_command(command: Command, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    # A `flwr` CLI call is a Python process of its own: on a machine whose cores are busy with
    # training it took over 60 s to start and answer; the limit only guards against a hang.
    return subprocess.run(list(command.argv), env=command.full_env(), cwd=command.cwd,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, check=False)


def register_sites(layout: CertLayout, sites: Sequence[str], flwr_home: Path,
                   bin_dir: Path | None = None) -> list[Registration]:
    """Register each site's `<site>.pub`; `flwr_home/config.toml` must hold the connection."""
    results = []
    for site in sites:
        pub = layout.site_pub(site)
        if not pub.is_file():
            results.append(Registration(site, None, False, f"{pub}: public key missing"))
            continue
        done = run_command(register_command(pub, flwr_home, node_name=site, bin_dir=bin_dir))
        results.append(parse_register_output(site, done.stdout, done.stderr))
    return results


def list_nodes(flwr_home: Path, bin_dir: Path | None = None) -> list[dict]:
    """The SuperLink's nodes (`node-id`, `status`: registered | online | offline | unregistered)."""
    done = run_command(list_nodes_command(flwr_home, bin_dir=bin_dir))
    data = _json_from(done.stdout)
    if not data.get("success"):
        raise LaunchError(f"flwr supernode list: {data.get('error-message') or done.stderr.strip()}")
    return list(data.get("nodes", []))


# ----------------------------------------------------------------------------- runs
# What a deployment run sets on top of pyproject's `[tool.flwr.app.config]` (where simulation keeps
# the defaults): model weights travel as float16 in both directions, half the bytes per round
# (the apps decode to float32 and aggregate in float32; see docs/deploy.md for the measured cost).
DEPLOYMENT_RUN_CONFIG: Mapping[str, str | int | float | bool] = {"fp16-transport": True}


def run_config_string(values: Mapping[str, str | int | float | bool]) -> str:
    """`--run-config` text (the same TOML key=value syntax as `--node-config`)."""
    return node_config_string(values)


def flwr_run_command(app_dir: Path, flwr_home: Path,
                     run_config: Mapping[str, str | int | float | bool] | None = None, *,
                     defaults: Mapping[str, str | int | float | bool] = DEPLOYMENT_RUN_CONFIG,
                     connection: str = CONNECTION_NAME, bin_dir: Path | None = None) -> Command:
    """`flwr run APP <connection> --run-config ... --format json`: `defaults` overridden by
    `run_config`. Output paths in it must be absolute (the ServerApp runs in the state folder)."""
    values = {**defaults, **(run_config or {})}
    argv = [flower_executable("flwr", bin_dir), "run", str(_abs(app_dir)), connection,
            "--format", "json"]
    if values:
        argv += ["--run-config", run_config_string(values)]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


def flwr_run_file_command(app_dir: Path, flwr_home: Path, settings: Path, *,
                          connection: str = CONNECTION_NAME, bin_dir: Path | None = None) -> Command:
    """`flwr run APP <connection> --run-config SETTINGS.toml --format json` (Flower reads the file
    itself; it must end in .toml and cannot be combined with key=value overrides)."""
    argv = [flower_executable("flwr", bin_dir), "run", str(_abs(app_dir)), connection,
            "--run-config", str(_abs(settings)), "--format", "json"]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


def run_status_command(run_id: int, flwr_home: Path, connection: str = CONNECTION_NAME,
                       bin_dir: Path | None = None) -> Command:
    argv = [flower_executable("flwr", bin_dir), "ls", connection, "--run-id", str(run_id),
            "--format", "json"]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


def parse_run_id(stdout: str, stderr: str = "") -> int:
    """The run id `flwr run --format json` printed; LaunchError with Flower's message if none."""
    data = _json_from(stdout)
    if data.get("success") and "run-id" in data:
        return int(data["run-id"])
    message = str(data.get("error-message") or stderr or stdout).strip()
    raise LaunchError(f"flwr run: {message.splitlines()[-1] if message else 'no run id printed'}")


def parse_run_status(stdout: str) -> str:
    """`finished:completed`, `finished:failed`, `running`, ... from `flwr ls --format json`;
    "" when the output holds no run."""
    runs = _json_from(stdout).get("runs") or []
    return str(runs[0].get("status", "")) if runs else ""


def submit_run(app_dir: Path, flwr_home: Path,
               run_config: Mapping[str, str | int | float | bool] | None = None, *,
               defaults: Mapping[str, str | int | float | bool] = DEPLOYMENT_RUN_CONFIG,
               bin_dir: Path | None = None, timeout: float = 300.0) -> int:
    """Build the app bundle, submit it to the SuperLink of `flwr_home`'s connection; the run id."""
    done = run_command(flwr_run_command(app_dir, flwr_home, run_config, defaults=defaults,
                                        bin_dir=bin_dir), timeout=timeout)
    return parse_run_id(done.stdout, done.stderr)


def wait_for_run(run_id: int, flwr_home: Path, *, timeout: float = 3600.0, poll: float = 1.0,
                 status_every: float = 30.0, ready: Callable[[], bool] | None = None,
                 watch: Sequence[ManagedProcess] = (), bin_dir: Path | None = None) -> str:
    """Wait until the run is `finished:*` and return that status (`flwr run` itself exits 0
    whatever happens); a description instead if a watched process exits or `timeout` passes.

    Each `flwr ls` is a Python process of its own (about 2 s of CPU): the status is asked every
    `status_every` seconds, and at every `poll` once `ready()` (e.g. "report.json exists") says
    the run is about to end. Every `poll` the watched processes' trees are recorded, so that
    `stop()` also finds the short-lived ServerApp/ClientApp processes they spawn."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + min(status_every, 5.0)
    status = ""
    while True:
        for proc in watch:
            proc.tree()
            if not proc.running:
                return f"{proc.name} exited with status {proc.poll()}"
        now = time.monotonic()
        if now >= next_status or (ready is not None and ready()) or now >= deadline:
            done = run_command(run_status_command(run_id, flwr_home, bin_dir=bin_dir))
            status = parse_run_status(done.stdout)
            if status.startswith("finished"):
                return status
            next_status = time.monotonic() + status_every
        if time.monotonic() >= deadline:
            return f"still {status or 'unknown'} after {timeout:.0f} s"
        time.sleep(poll)


# ----------------------------------------------------------------------------- processes
def missing_files(paths: Sequence[Path]) -> list[str]:
    return [f"{p}: file not found" for p in paths if not Path(p).is_file()]


def run_foreground(command: Command, replace_process: bool = True) -> int:
    """Run `command` in the foreground and return its exit status.

    On POSIX the current process becomes the command (exec): a service manager's SIGTERM, a
    terminal's Ctrl-C and the exit status then reach and come from Flower directly, and no
    wrapper can die and leave it orphaned."""
    if command.cwd is not None:
        Path(command.cwd).mkdir(parents=True, exist_ok=True)
    env = command.full_env()
    if replace_process and os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        if command.cwd is not None:
            os.chdir(command.cwd)
        os.execvpe(command.argv[0], list(command.argv), env)
    proc = subprocess.Popen(list(command.argv), env=env, cwd=command.cwd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the terminal's SIGINT too: give it time to stop
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


class ProcessGroup:
    """Background Flower processes with logs in `log_dir`; all stopped on exit of the `with`.

    >>> with ProcessGroup(tmp / "logs") as group:
    ...     link = group.start_superlink(SuperLinkConfig.from_certs(certs, tmp / "link", port=p))
    ...     group.register(CertLayout(certs), ["A"], link_config)
    ...     node = group.start_supernode(node_config, wait_connected=True)
    """

    def __init__(self, log_dir: Path, bin_dir: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.bin_dir = bin_dir
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, command: Command) -> ManagedProcess:
        if command.cwd is not None:
            Path(command.cwd).mkdir(parents=True, exist_ok=True)
        proc = ManagedProcess(name, command.argv, self.log_dir / f"{name}.log",
                              env=command.full_env(), cwd=command.cwd)
        self.processes.append(proc)  # before start: stop_all() covers a half-started process
        return proc.start()

    def start_superlink(self, config: SuperLinkConfig, timeout: float = 60.0,
                        name: str = "superlink") -> ManagedProcess:
        """Start and wait until its port accepts connections."""
        if problems := missing_files(config.files):
            raise LaunchError(problems[0])
        proc = self.start(name, superlink_launch_command(config, self.bin_dir))
        host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        proc.wait_for_port(host, config.port, timeout)
        return proc

    def register(self, layout: CertLayout, sites: Sequence[str], config: SuperLinkConfig,
                 address: str | None = None) -> list[Registration]:
        """Write the CLI connection for `config` and register the sites' public keys."""
        address = address or f"{'127.0.0.1' if config.host == '0.0.0.0' else config.host}:{config.port}"
        write_connection_config(config.cli_home, address, config.ca_cert)
        return register_sites(layout, sites, config.cli_home, self.bin_dir)

    def start_supernode(self, config: SuperNodeConfig, wait_connected: bool = False,
                        timeout: float = 60.0, name: str | None = None) -> ManagedProcess:
        """Start; with `wait_connected`, return once the SuperLink accepted the node."""
        if problems := missing_files(config.files):
            raise LaunchError(problems[0])
        proc = self.start(name or f"supernode-{config.site}", supernode_command(config, self.bin_dir))
        if wait_connected:
            proc.wait_for_log("SuperNode ID:", timeout)  # logged after the SuperLink activated it
        return proc

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every process started here, newest first (nodes before their SuperLink)."""
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout)
            except Exception as err:  # keep stopping the others  # noqa: BLE001
                errors.append(f"{proc.name}: {err}")
        if errors:
            raise ProcessError("; ".join(errors))

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
