"""Launch commands (`deploy.launch`) against the installed Flower: flags exist in its --help,
node config and connection config parse back through Flower's own parsers, the compose files run
the same flags, the process helper stops whole process trees, and a real TLS + node-auth SuperLink
starts and stops cleanly on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from deploy.certs import CertConfig, CertLayout, generate_federation_certs
from deploy.launch import (
    QUIET_ENV, Command, LaunchError, ProcessGroup, SuperLinkConfig, SuperNodeConfig,
    connection_toml, flower_executable, list_nodes_command, node_config_string,
    parse_register_output, register_command, superlink_command, supernode_command,
    write_connection_config,
)
from deploy.process import ManagedProcess, ProcessError, free_port, list_processes, process_tree
from fedliver.cli import main

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _help_flags(outputs: dict[str, subprocess.Popen[str]]) -> dict[str, set[str]]:
    flags = {}
    for name, proc in outputs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        flags[name] = set(FLAG.findall(re.sub(r"\x1b\[[0-9;]*m", "", out)))
        assert "--help" in flags[name]
    return flags


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """Flags listed by the installed commands' --help (run side by side: each takes seconds)."""
    commands = {
        "flower-superlink": ["flower-superlink"],
        "flower-supernode": ["flower-supernode"],
        "register": ["flwr", "supernode", "register"],
    }
    env = {**os.environ, **QUIET_ENV, "COLUMNS": "200"}
    procs = {name: subprocess.Popen([flower_executable(argv[0]), *argv[1:], "--help"], encoding="utf-8", errors="replace",
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for name, argv in commands.items()}
    return _help_flags(procs)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertLayout:
    return generate_federation_certs(tmp_path_factory.mktemp("c") / "certs",
                                     CertConfig(sites=("A", "B1", "C")))


def _flags(argv: tuple[str, ...]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def _value(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _link_config(certs: CertLayout, state: Path, **kw: object) -> SuperLinkConfig:
    return SuperLinkConfig.from_certs(certs.root, state, **kw)


def _node_config(certs: CertLayout, tmp: Path, site: str = "A", **kw: object) -> SuperNodeConfig:
    return SuperNodeConfig(site=site, role="train", data_dir=tmp / "data dir", superlink="127.0.0.1:8000",
                           ca_cert=certs.site_ca(site), private_key=certs.site_key(site),
                           state_dir=tmp / f"node-{site}", **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- builders
def test_superlink_flags_exist_and_secure(certs: CertLayout, tmp_path: Path,
                                          help_flags: dict[str, set[str]]) -> None:
    config = _link_config(certs, tmp_path / "state", host="0.0.0.0", port=9123,
                          extra_args=("--log-file", "x.log"))
    cmd = superlink_command(config)
    assert set(_flags(cmd.argv)) <= help_flags["flower-superlink"]
    assert "--insecure" not in cmd.argv and "--enable-supernode-auth" in cmd.argv
    assert _value(cmd.argv, "--ssl-ca-certfile") == str(certs.server_ca)
    assert _value(cmd.argv, "--ssl-certfile") == str(certs.server_cert)
    assert _value(cmd.argv, "--ssl-keyfile") == str(certs.server_key)
    assert _value(cmd.argv, "--database") == str(tmp_path / "state" / "state.db")
    assert _value(cmd.argv, "--port") == "9123" and _value(cmd.argv, "--host") == "0.0.0.0"
    assert "--disable-runtime-dependency-installation" in cmd.argv
    assert cmd.argv[-2:] == ("--log-file", "x.log")
    assert cmd.env["FLWR_HOME"] == str(tmp_path / "state" / "superlink-home")
    assert cmd.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert cmd.env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert cmd.cwd == tmp_path / "state"
    # `--certs` may also name the superlink/ folder itself
    assert superlink_command(_link_config(certs, tmp_path / "state")).argv[2] == str(certs.server_ca)
    assert SuperLinkConfig.from_certs(certs.superlink_dir, tmp_path).server_key == certs.server_key


def test_supernode_flags_exist_and_secure(certs: CertLayout, tmp_path: Path,
                                          help_flags: dict[str, set[str]]) -> None:
    cmd = supernode_command(_node_config(certs, tmp_path, port=9200, max_retries=3, max_wait_time=5))
    assert set(_flags(cmd.argv)) <= help_flags["flower-supernode"]
    assert "--insecure" not in cmd.argv
    assert _value(cmd.argv, "--root-certificates") == str(certs.site_ca("A"))
    assert _value(cmd.argv, "--auth-supernode-private-key") == str(certs.site_key("A"))
    assert _value(cmd.argv, "--port") == "9200" and _value(cmd.argv, "--max-retries") == "3"
    assert cmd.env["FLWR_HOME"] == str(tmp_path / "node-A" / "flwr-home")
    assert "--allow-runtime-dependency-installation" not in cmd.argv


def test_register_and_list_flags_exist(certs: CertLayout, tmp_path: Path,
                                       help_flags: dict[str, set[str]]) -> None:
    reg = register_command(certs.site_pub("A"), tmp_path, node_name="A")
    assert reg.argv[1:5] == ("supernode", "register", str(certs.site_pub("A")), "fedliver")
    assert set(_flags(reg.argv)) <= help_flags["register"]
    assert _flags(list_nodes_command(tmp_path).argv) == ["--format"]  # run for real in the e2e test
    assert reg.env["FLWR_HOME"] == str(tmp_path)


def test_forbidden_extra_args(certs: CertLayout, tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="--insecure"):
        superlink_command(_link_config(certs, tmp_path, extra_args=("--insecure",)))
    with pytest.raises(LaunchError, match="allow-runtime"):
        supernode_command(_node_config(certs, tmp_path,
                                       extra_args=("--allow-runtime-dependency-installation",)))
    with pytest.raises(LaunchError, match="--role"):
        _node_config(certs, tmp_path).__class__(**{**_node_config(certs, tmp_path).__dict__,
                                                    "role": "both"})
    with pytest.raises(LaunchError, match="HOST:PORT"):
        _node_config(certs, tmp_path).__class__(**{**_node_config(certs, tmp_path).__dict__,
                                                    "superlink": "https://x:8000"})


def test_node_config_round_trips_through_flower(certs: CertLayout, tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    config = _node_config(certs, tmp_path, cache_dir=tmp_path / "cache")
    text = _value(supernode_command(config).argv, "--node-config")
    assert parse_config_args([text]) == {
        "site": "A", "role": "train", "data-dir": str(tmp_path / "data dir"),
        "cache-dir": str(tmp_path / "cache")}
    odd = {"site": "B1", "data-dir": r"C:\data\site b1", "note": 'say "hi"', "n": 3, "on": True}
    assert parse_config_args([node_config_string(odd)]) == odd
    with pytest.raises(LaunchError):
        node_config_string({"x": "a'b\"c"})


def test_command_env_puts_flower_bin_first(tmp_path: Path) -> None:
    cmd = Command(("/opt/venv/bin/flower-superlink", "--help"), {"FLWR_HOME": str(tmp_path)})
    env = cmd.full_env({"PATH": "/usr/bin", "KEEP": "1"})
    assert env["PATH"] == "/opt/venv/bin" + os.pathsep + "/usr/bin"
    assert env["KEEP"] == "1" and env["FLWR_HOME"] == str(tmp_path)
    assert cmd.shell().startswith(f"FLWR_HOME={tmp_path} /opt/venv/bin/flower-superlink")


# ----------------------------------------------------------------------------- connection / registration
def test_connection_config_is_read_by_flower(tmp_path: Path, certs: CertLayout,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "home"
    write_connection_config(home, "127.0.0.1:9999", certs.ca_cert)
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("fedliver")
    assert conn.address == "127.0.0.1:9999"
    assert conn.root_certificates == str(certs.ca_cert) and not conn.insecure
    assert read_superlink_connection(None).address == "127.0.0.1:9999"  # also the default
    # updating keeps other connections and the existing default
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection_config(home, "10.0.0.1:8000", certs.ca_cert)
    assert read_superlink_connection("local").address == ":local:"
    assert read_superlink_connection("fedliver").address == "10.0.0.1:8000"
    assert 'root-certificates = "' in connection_toml("h:1", certs.ca_cert)


def test_parse_register_output() -> None:
    ok = parse_register_output("A", '{\n  "success": true,\n  "node-id": 1234\n}\n')
    assert ok.node_id == 1234 and not ok.already
    again = parse_register_output("A", json.dumps({
        "success": False,
        "error-message": "Using SuperLink: fedliver (127.0.0.1:1)\n\n[code: 23] Public key already in use."}))
    assert again.already and again.node_id is None
    bad = parse_register_output("A", json.dumps({"success": False, "error-message": "boom\nreal reason"}))
    assert not bad.already and bad.node_id is None and bad.message == "real reason"


# ----------------------------------------------------------------------------- compose files
def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, op = m.group(1), m.group(2) or ""
        if name in env:
            return env[name]
        if op.startswith(":-"):
            return op[2:]
        raise KeyError(f"{name} unset and required ({op})")
    return re.sub(r"\$\{([A-Z_]+)((?::[-?])[^}]*)?\}", sub, value)


def _service(file: str, env: dict[str, str]) -> dict:
    (service,) = yaml.safe_load((COMPOSE / file).read_text())["services"].values()
    service["command"] = [_interpolate(str(a), env) for a in service["command"]]
    service["volumes"] = [_interpolate(v, env) for v in service["volumes"]]
    return service


def test_coordinator_compose_matches_launcher() -> None:
    env = {"FEDLIVER_CERTS": "/secure/certs", "FEDLIVER_STATE": "/srv/state"}
    service = _service("coordinator.yaml", env)
    cert = Path("/app/certificates")
    config = SuperLinkConfig(cert / "ca.crt", cert / "server.crt", cert / "server.key",
                             Path("/app/state"), host="0.0.0.0", port=8000)
    cmd = superlink_command(config)
    assert service["command"] == list(cmd.argv[1:])
    assert service["build"]["args"]["BASE_IMAGE"] == "flwr/superlink:1.42.0"
    assert service["environment"] == dict(cmd.env)
    assert service["working_dir"] == str(cmd.cwd)
    for name in ("ca.crt", "server.crt", "server.key"):
        assert f"/secure/certs/superlink/{name}:/app/certificates/{name}:ro" in service["volumes"]
    with pytest.raises(KeyError):
        _service("coordinator.yaml", {})


def test_site_compose_matches_launcher() -> None:
    env = {"FEDLIVER_SITE": "B1", "FEDLIVER_ROLE": "eval", "FEDLIVER_SUPERLINK": "fl.example:8000",
           "FEDLIVER_KEYS": "/secure/b1", "FEDLIVER_KEY_NAME": "b1.key",
           "FEDLIVER_DATA": "/data/b1", "FEDLIVER_STATE": "/srv/node"}
    service = _service("site.yaml", env)
    cert = Path("/app/certificates")
    config = SuperNodeConfig(site="B1", role="eval", data_dir=Path("/app/data"),
                             superlink="fl.example:8000", ca_cert=cert / "ca.crt",
                             private_key=cert / "site.key", state_dir=Path("/app/state"))
    cmd = supernode_command(config)
    assert service["command"] == list(cmd.argv[1:])
    assert service["build"]["args"]["BASE_IMAGE"] == "flwr/supernode:1.42.0"
    assert service["environment"] == dict(cmd.env)
    assert "/secure/b1/b1.key:/app/certificates/site.key:ro" in service["volumes"]
    assert "/data/b1:/app/data:ro" in service["volumes"]


def test_dockerfile_copies_what_the_package_needs() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    for folder in ("common", "client", "server", "deploy", "fedliver"):
        assert f"COPY --chown=app:app {folder} ./{folder}" in text


# ----------------------------------------------------------------------------- process helper
_TREE_SCRIPT = textwrap.dedent("""
    import signal, socket, subprocess, sys, time
    # a child in its own session (like the SuperLink's SuperExec) that ignores SIGTERM
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
        start_new_session=True)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", child.pid, grandchild.pid, flush=True)
    time.sleep(600)
""")


def test_managed_process_stops_whole_tree(tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess("tree", [sys.executable, "-c", _TREE_SCRIPT, str(port)], tmp_path / "t.log")
    proc.start()
    try:
        proc.wait_for_port("127.0.0.1", port, timeout=60)
        proc.wait_for_log("listening", timeout=30)
        line = next(l for l in proc.log_text().splitlines() if l.startswith("listening"))
        child, grandchild = (int(x) for x in line.split()[1:])
        assert {proc.pid, child, grandchild} <= proc.tree()
    finally:
        status = proc.stop(timeout=2.0)
    assert status is not None and status != 0
    alive = {p for p in (proc.pid, child, grandchild)
             if p in list_processes() and list_processes()[p].state != "Z"}
    assert not alive
    assert not process_tree(proc.pid)


def test_wait_for_port_reports_early_exit(tmp_path: Path) -> None:
    proc = ManagedProcess("dies", [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"],
                          tmp_path / "d.log").start()
    with pytest.raises(ProcessError, match="(?s)exited with status 3.*bad flag"):
        proc.wait_for_port("127.0.0.1", free_port(), timeout=60)
    proc.stop()


def test_group_stops_everything_on_error(tmp_path: Path) -> None:
    sleeper = Command((sys.executable, "-c", "import time; time.sleep(600)"))
    with pytest.raises(RuntimeError, match="boom"):
        with ProcessGroup(tmp_path / "logs") as group:
            procs = [group.start(f"s{i}", sleeper) for i in range(2)]
            raise RuntimeError("boom")
    assert all(not p.running for p in procs)
    assert (tmp_path / "logs" / "s1.log").exists()


def test_group_refuses_missing_cert_files(certs: CertLayout, tmp_path: Path) -> None:
    config = SuperLinkConfig(certs.server_ca, certs.server_cert, tmp_path / "nope.key", tmp_path)
    with ProcessGroup(tmp_path / "logs") as group, pytest.raises(LaunchError, match="nope.key"):
        group.start_superlink(config)
    assert not group.processes


# ----------------------------------------------------------------------------- CLI
def test_cli_dry_runs(certs: CertLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["superlink", "--certs", str(certs.root), "--state", str(tmp_path / "s"),
                 "--port", "9001", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--enable-supernode-auth" in out and "--port 9001" in out and "--insecure" not in out
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    assert main(["supernode", "--site", "A", "--role", "eval", "--data-dir", str(tmp_path),
                 "--superlink", "fl.example:8000", "--ca", str(certs.site_ca("A")),
                 "--key", str(certs.site_key("A")), "--state", str(tmp_path / "n"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"role=\"eval\" data-dir=\"{tmp_path}\"" in out
    assert main(["register", "--certs", str(certs.root), "--state", str(tmp_path / "s"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("flwr supernode register") == 3 and "b1.pub" in out
    assert main(["superlink", "--certs", str(certs.root), "--state", str(tmp_path / "s"),
                 "--extra=--insecure", "--dry-run"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_cli_supernode_reports_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["supernode", "--site", "A", "--data-dir", str(tmp_path / "nodata"),
               "--superlink", "h:1", "--ca", str(tmp_path / "ca.crt"), "--key", str(tmp_path / "a.key"),
               "--state", str(tmp_path / "n")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert f"{tmp_path / 'ca.crt'}: file not found" in err
    assert f"{tmp_path / 'nodata'}: data folder not found" in err



def test_cli_supernode_device_goes_to_node_config_and_is_checked(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["supernode", "--site", "A", "--data-dir", str(tmp_path), "--superlink", "h:1",
            "--ca", str(tmp_path / "ca.crt"), "--key", str(tmp_path / "a.key"), "--state", str(tmp_path / "n")]
    assert main([*args, "--device", "cpu", "--dry-run"]) == 0
    assert "device=\"cpu\"" in capsys.readouterr().out.replace("'", '"')
    assert main([*args, "--device", "cuda"]) == 2  # no GPU here: refused before connecting
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]

# ----------------------------------------------------------------------------- real SuperLink
def test_real_superlink_tls_auth_starts_and_stops(certs: CertLayout, tmp_path: Path) -> None:
    port = free_port()
    config = _link_config(certs, tmp_path / "state", port=port)
    with ProcessGroup(tmp_path / "logs") as group:
        link = group.start_superlink(config, timeout=90)
        tree = link.tree()
        assert len(tree) >= 2  # the SuperLink and the SuperExec it runs ServerApps with
        # It serves TLS with our certificate: a client trusting only ca.crt connects...
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # ... a client with the system trust store is refused.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    assert not link.running
    deadline = time.monotonic() + 10  # stop() already waited; allow the kernel to finish up
    while time.monotonic() < deadline and any(p in list_processes() and list_processes()[p].state != "Z"
                                              for p in tree):
        time.sleep(0.2)
    left = [p for p in tree if p in list_processes() and list_processes()[p].state != "Z"]
    assert not left, f"processes left: {left}"
    assert (tmp_path / "state" / "state.db").is_file()
    assert "Starting Flower SuperLink" in link.log_text()


# ----------------------------------------------------------------------------- the coordinator's run settings
REPO = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_run_settings_pass(tmp_path: Path) -> None:
    from deploy.run_settings import check_run_settings

    settings = check_run_settings(REPO / "deploy" / "run.toml", REPO)
    assert settings.ok, settings.problems
    assert settings.sites == (("A", "train"), ("B1", "train"), ("B2", "train"), ("C", "eval"))
    assert settings.init_note.endswith("(shipped pretraining, init-weights auto)")
    assert "simulations/pretrained/stunet_T4_synth.safetensors" in settings.summary()


def test_run_settings_problems_one_line_each(tmp_path: Path) -> None:
    from deploy.run_settings import check_run_settings

    path = _settings(tmp_path, """\
        sites = "A:train,B1:trian,A:eval"
        num-rounds = 3
        local_iterations = 30
        learning-rate = "fast"
        run-dir = "runs/r1"
        init-weights = "/nowhere/model.safetensors"
        """)
    problems = check_run_settings(path, REPO).problems
    assert all("\n" not in p and p.startswith(str(path)) for p in problems)
    text = "\n".join(problems)
    assert "unknown key 'num-rounds' (did you mean 'num-server-rounds'?)" in text
    assert "unknown key 'local_iterations' (did you mean 'local-iterations'?)" in text
    assert "learning-rate = 'fast': expected a number" in text
    assert "'B1:trian': write SITE:ROLE" in text and "site A is listed twice" in text
    assert "run-dir 'runs/r1': give an absolute folder" in text
    # the checkpoint is looked at once the rest is right
    fixed = _settings(tmp_path, f"""\
        sites = "A:train,C:eval"
        run-dir = "{tmp_path / 'run'}"
        init-weights = "/nowhere/model.safetensors"
        """)
    assert check_run_settings(fixed, REPO).problems == (f"{fixed}: init-weights /nowhere/model.safetensors: not found on this host",)


def test_run_settings_need_sites_run_dir_and_init_and_a_training_site(tmp_path: Path) -> None:
    from deploy.run_settings import check_run_settings

    text = "\n".join(check_run_settings(_settings(tmp_path, "num-server-rounds = 2\n"), REPO).problems)
    for key in ("sites not set", "run-dir not set", "init-weights not set"):
        assert key in text, text
    only_eval = _settings(tmp_path, f'sites = "C:eval"\nrun-dir = "{tmp_path}"\ninit-weights = "none"\n'
                                    "min-train-nodes = 1\n")
    assert check_run_settings(only_eval, REPO).problems == (f"{only_eval}: sites: no site has role train "
                                                            "(held-out sites only evaluate)",)
    too_few = _settings(tmp_path, f'sites = "A:train,C:eval"\nrun-dir = "{tmp_path}"\ninit-weights = "none"\n'
                                  "min-train-nodes = 2\n")
    assert check_run_settings(too_few, REPO).problems == (f"{too_few}: sites: 1 training sites, but min-train-nodes = 2",)


def test_submit_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _settings(tmp_path, 'sites = "A:train"\nrounds = 3\n')
    assert main(["submit", str(bad), "--state", str(tmp_path / "state"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'rounds' (did you mean 'num-server-rounds'?)" in err
    good = _settings(tmp_path, f'sites = "A:train,C:eval"\nrun-dir = "{tmp_path / "r"}"\ninit-weights = "none"\n')
    assert main(["submit", str(good), "--state", str(tmp_path / "state"), "--check"]) == 0
    captured = capsys.readouterr()
    assert "sites: A (train), C (eval)" in captured.out and "initial weights: random" in captured.out
    assert "run `fedliver register`" in captured.err  # no connection yet: said, not an error
    assert not (tmp_path / "state").exists()  # checking writes nothing


def test_init_weights_auto_follows_the_net_size(tmp_path: Path) -> None:
    from common.federation_config import resolve_init_weights

    path, note = resolve_init_weights("auto", "T", 4)
    assert path is not None and path.is_absolute() and path.name == "stunet_T4_synth.safetensors"
    assert resolve_init_weights("auto", "B", None)[0] is None  # no shipped file for the published sizes
    assert resolve_init_weights("none", "T", 4) == (None, "random (init-weights is empty)")
    with pytest.raises(ValueError, match="not found on this host"):
        resolve_init_weights(str(tmp_path / "x.pth"), "T", 4)


# ----------------------------------------------------------------------------- status
def test_status_names_sites_and_keeps_full_run_status(tmp_path: Path) -> None:
    from deploy.launch import Registration
    from deploy.status import combine, format_status, record_registrations, record_run

    pubs = {s: tmp_path / f"{s}.pub" for s in ("A", "B2")}
    for site, pub in pubs.items():
        pub.write_text(f"ecdsa-sha2-nistp384 AAAA{site} fedliver-{site}\n")
    record_registrations(tmp_path, [Registration("A", 11, False, "registered"),
                                    Registration("B2", 22, False, "registered")], pubs)
    record_registrations(tmp_path, [Registration("A", None, True, "already registered")], pubs)
    registry = json.loads((tmp_path / "sites.json").read_text())
    assert registry["A"]["node-id"] == "11" and len(registry["A"]["public-key-sha256"]) == 64
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    (run_dir / "server_state.json").write_text('{"last_round": 2}')
    record_run(tmp_path, 7, tmp_path / "run.toml", {"run-dir": str(run_dir), "num-server-rounds": 5})
    nodes = [{"node-id": "11", "status": "online"}, {"node-id": "22", "status": "registered"},
             {"node-id": "33", "status": "online"}]
    runs = [{"run-id": "6", "status": "finished:failed", "status-details": "ServerApp raised: a very long reason " * 3,
             "elapsed": 5.0, "pending-at": "2026-01-01 10:00:00"},
            {"run-id": "7", "status": "running", "elapsed": 3725.0, "pending-at": "2026-01-01 11:00:00"}]
    status = combine(registry, nodes, runs, json.loads((tmp_path / "runs.json").read_text()))
    text = format_status(status)
    assert text.splitlines()[0] == "sites online: A, node 33"
    assert re.search(r"^B2\s+registered\s+22$", text, re.M)
    assert "current run: 7, running, round 2 of 5 done, 1h02m05s" in text
    assert "finished:failed (ServerApp raised: a very long reason" in text  # never cut
    assert "(not submitted with fedliver submit)" in text


# ----------------------------------------------------------------------------- the site's data check
def test_site_data_check(tmp_path: Path) -> None:
    from deploy.site_check import check_site_data
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    (tmp_path / "empty").mkdir()
    assert not check_site_data(tmp_path / "empty", "train").ok
    tree = tmp_path / "liqa"
    generate_liqa_tree(tree, PhantomConfig(centers=("A", "C"), cases=1, labeled=1, seed=0, profile="demo",
                                           heldout=("C",)))
    whole = check_site_data(tree, "train")
    assert not whole.ok and "2 vendor folders (Vendor_A, Vendor_C)" in whole.message
    assert f"point it at this site's own folder, e.g. {tree / 'Vendor_A'}" in whole.message
    assert check_site_data(tree / "Vendor_A", "train").ok
    assert check_site_data(tree / "Vendor_C", "eval").ok
    for mask in (tree / "Vendor_A").rglob("mask_*.nii.gz"):
        mask.unlink()
    unlabeled = check_site_data(tree / "Vendor_A", "train")
    assert not unlabeled.ok and "none usable for role train" in unlabeled.message


def test_supernode_refuses_an_empty_folder_quickly(certs: CertLayout, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    argv = [sys.executable, "-m", "fedliver", "supernode", "--site", "A", "--data-dir", str(tmp_path / "empty"),
            "--superlink", "127.0.0.1:9", "--ca", str(certs.site_ca("A")), "--key", str(certs.site_key("A")),
            "--state", str(tmp_path / "n")]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, encoding="utf-8", errors="replace", timeout=60, check=False)
    seconds = time.monotonic() - started
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"not starting: {tmp_path / 'empty'}: not a dataset"), line
    assert seconds < 5, seconds
    print(f"refused in {seconds:.2f} s")
