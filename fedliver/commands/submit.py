"""`fedliver submit RUN.toml --state DIR [--federation fedliver] [--app DIR] [--check] [--wait]`.

Checks the coordinator's run settings (a TOML file like deploy/run.toml: sites and roles,
rounds, local iterations, initial weights, aggregation) against the app's run-config keys, prints
what the run will do, warns about listed sites that are not registered or not online, then runs
`flwr run APP FEDERATION --run-config RUN.toml` with the CLI connection in <state>/cli-home and
records the run id with its run folder in <state>/runs.json (for `fedliver status`). With
--check it stops after the check; with --wait it prints the ServerApp's log as it comes and the
run's status and round, and exits 0 only when the run finished:completed. Exit status 2 when the settings have problems, one line each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def default_app_dir() -> Path:
    """The fedliver source folder this command runs from (it holds the Flower app's pyproject)."""
    import fedliver

    root = Path(fedliver.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="check the coordinator's run settings file and start the run (flwr run)",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("settings", type=Path, metavar="RUN.toml", help="run settings (see deploy/run.toml)")
    parser.add_argument("--state", type=Path, required=True,
                        help="the SuperLink's state folder (as for fedliver superlink/register)")
    parser.add_argument("--federation", default="fedliver",
                        help="connection name in <state>/cli-home/config.toml (default fedliver)")
    parser.add_argument("--app", type=Path, default=None,
                        help="the Flower app folder to bundle (default: this fedliver's source folder)")
    parser.add_argument("--check", action="store_true", help="only check the settings, start nothing")
    parser.add_argument("--wait", action="store_true",
                        help="follow the run until it finishes; exit 1 unless it finished:completed")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between checks with --wait (default 30)")
    parser.set_defaults(run=run)


def _site_warnings(settings_sites: list[tuple[str, str]], state: Path) -> list[str]:
    """Listed sites that were never registered here or are not online now (not errors: a site may
    come online while the ServerApp waits)."""
    from deploy.launch import LaunchError
    from deploy.status import SITES_FILE, _read_json, gather_status

    registry = _read_json(state / SITES_FILE)
    warnings = [f"site {site} was not registered with `fedliver register` here"
                for site, _ in settings_sites if registry and site not in registry]
    if not (state / "cli-home" / "config.toml").is_file():
        return warnings + [f"{state / 'cli-home' / 'config.toml'}: no connection to the SuperLink; "
                           "run `fedliver register` (or `fedliver superlink`) with this --state first"]
    try:
        online = {s.site for s in gather_status(state).sites if s.status == "online"}
    except LaunchError as err:
        return warnings + [f"could not list the nodes: {' '.join(str(err).split())[-300:]}"]
    waiting = [site for site, _ in settings_sites if site in registry and site not in online]
    if waiting:
        warnings.append(f"not online now: {', '.join(waiting)}; the ServerApp waits for them up to node-wait seconds")
    return warnings


def run(args: argparse.Namespace) -> int:
    from deploy.launch import LaunchError, flwr_run_file_command, parse_run_id, run_command
    from deploy.run_settings import RunSettingsError, check_run_settings
    from deploy.status import record_run, run_status

    app = (args.app or default_app_dir()).expanduser().resolve()
    state = args.state.expanduser().resolve()
    if args.settings.suffix != ".toml":
        print(f"{args.settings}: the settings file must end in .toml (flwr run reads only those)", file=sys.stderr)
        return 2
    try:
        settings = check_run_settings(args.settings, app)
    except RunSettingsError as err:
        print(err, file=sys.stderr)
        return 2
    if not settings.ok:
        print("\n".join(settings.problems), file=sys.stderr)
        return 2
    print(f"{settings.path}: ok\n{settings.summary()}", flush=True)
    for warning in _site_warnings(list(settings.sites), state):
        print(f"warning: {warning}", file=sys.stderr)
    if args.check:
        return 0
    command = flwr_run_file_command(app, state / "cli-home", settings.path, connection=args.federation)
    done = run_command(command, timeout=600)
    try:
        run_id = parse_run_id(done.stdout, done.stderr)
    except LaunchError as err:
        print(err, file=sys.stderr)
        return 1
    record_run(state, run_id, settings.path.resolve(), settings.merged)
    print(f"run {run_id} submitted; follow it with: fedliver status --state {state}\n"
          f"its log: FLWR_HOME={state / 'cli-home'} flwr log {run_id} {args.federation} --stream", flush=True)
    if not args.wait:
        return 0
    return follow(run_id, state, args.federation, args.poll)


def follow(run_id: int, state: Path, federation: str, poll: float) -> int:
    """Print the ServerApp's log as it comes (`flwr log --stream`) and a line whenever the run's
    status or round changes; 0 once it finished:completed, 1 for any other end."""
    import subprocess

    from deploy.launch import QUIET_ENV, Command, LaunchError, flower_executable
    from deploy.status import run_status

    log = Command((flower_executable("flwr"), "log", str(run_id), federation, "--stream"),
                  {"FLWR_HOME": str(state / "cli-home"), **QUIET_ENV})
    stream = subprocess.Popen(list(log.argv), env=log.full_env(), stdin=subprocess.DEVNULL)
    said, next_check = "", 0.0
    try:
        while True:
            # The stream ends by itself when the run does: ask at once then, else every `poll` s.
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + (poll if stream.poll() is None else 2.0)
                text = f"run {run_id}: not listed yet"
                try:
                    current = run_status(state, run_id)
                except LaunchError as err:
                    current, text = None, f"run {run_id}: status unknown ({' '.join(str(err).split())[-200:]})"
                if current is not None:
                    text = f"run {run_id}: {current.status}, round {current.round_done} of {current.rounds} done"
                    if current.status.startswith("finished"):
                        print(text, flush=True)
                        return 0 if current.status == "finished:completed" else 1
                if text != said:
                    print(text, flush=True)
                    said = text
            time.sleep(1.0)
    finally:
        if stream.poll() is None:
            stream.terminate()
            try:
                stream.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stream.kill()
