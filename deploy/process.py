"""Start long-running processes in their own session and stop them with everything they spawned.

Flower's SuperLink and SuperNode each spawn a `flower-superexec`, which spawns ServerApp/ClientApp
processes; the SuperLink's SuperExec even starts a new session of its own. Killing the process
group of the started command is therefore not enough: `stop()` collects the whole tree (children
by parent id, plus every member of the sessions they lead) before signalling, SIGTERM first,
SIGKILL for what is left after the grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str          # "R", "S", "Z" (zombie: already dead, waiting to be reaped), ...


def list_processes() -> dict[int, ProcInfo]:
    """Every process visible in /proc (Linux); empty where /proc does not exist."""
    out: dict[int, ProcInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue  # exited while we were looking
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry)] = ProcInfo(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), fields[0])
    return out


def process_tree(root: int, extra_sessions: Sequence[int] = ()) -> set[int]:
    """Live (non-zombie) pids in `root`'s tree: descendants by parent id, and every member of a
    session led by `root`, by one of its descendants, or listed in `extra_sessions`."""
    procs = list_processes()
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = [root]
    sessions = {root, *extra_sessions}
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        info = procs.get(pid)
        if info is not None and info.sid == pid:
            sessions.add(pid)
        todo.extend(children.get(pid, []))
        if not todo:  # then sweep the sessions: orphans re-parented to init still belong to them
            todo.extend(p.pid for p in procs.values() if p.sid in sessions and p.pid not in found)
    found.discard(os.getpid())
    return {pid for pid in found if pid in procs and procs[pid].state != "Z"}


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ProcessError(RuntimeError):
    """A managed process exited or did not become ready; the message ends with its log tail."""


class ManagedProcess:
    """One command started in a new session, its output in `log_path`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._known: set[int] = set()  # every pid ever seen in the tree (kept for stop())

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: signals from the caller's terminal do not reach it, and its process
            # group can be signalled as a whole.
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise ProcessError(f"{self.name}: not started")
        return self.popen.pid

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Exit status (negative: killed by that signal). Raises subprocess.TimeoutExpired."""
        if self.popen is None:
            raise ProcessError(f"{self.name}: not started")
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _fail(self, what: str) -> ProcessError:
        return ProcessError(f"{self.name}: {what}; log {self.log_path}:\n{self.log_tail()}")

    def wait_for_port(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Return once `host:port` accepts TCP connections; raise if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(host, port):
                return
            if not self.running:
                raise self._fail(f"exited with status {self.poll()} before {host}:{port} opened")
            time.sleep(0.2)
        raise self._fail(f"{host}:{port} did not open within {timeout:.0f} s")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Return once `text` appears in the log; raise if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if not self.running:
                raise self._fail(f"exited with status {self.poll()} before logging {text!r}")
            time.sleep(0.2)
        raise self._fail(f"{text!r} not logged within {timeout:.0f} s")

    def tree(self) -> set[int]:
        """Live pids of the process and everything it spawned."""
        if self.popen is None:
            return set()
        pids = process_tree(self.popen.pid, extra_sessions=sorted(self._known))
        self._known |= pids
        return pids

    def kill(self) -> set[int]:
        """SIGKILL the process and everything it spawned at once: a crash (power cut, OOM killer,
        kill -9), not a shutdown; nothing gets to clean up. Returns the pids signalled."""
        pids = self.tree()
        for pid in sorted(pids):
            _signal(pid, signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        # SIGKILL is delivered asynchronously and a large process (torch) takes a moment to tear
        # down: return once none of them runs, so callers see the crash as complete.
        deadline = time.monotonic() + 10.0
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the tree, SIGKILL what survives `timeout` seconds; return the exit status."""
        if self.popen is None:
            return None
        pids = self.tree()
        for pid in sorted(pids):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.popen.poll()  # reap our child so it does not linger as a zombie
            pids = self.tree() | {p for p in pids if _alive(p)}
            if not pids:
                break
            time.sleep(0.1)
        for pid in sorted(pids):
            _signal(pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            return None

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.popen.pid if self.popen else None})"


def _alive(pid: int) -> bool:
    info = list_processes().get(pid)
    if info is not None:
        return info.state != "Z"
    if not os.path.isdir("/proc"):  # no /proc: ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
