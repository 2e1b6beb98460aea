"""``taskwarden serve`` over stdio: a relay to the daemon of its database.

This module imports the standard library only: an MCP client waits for
``initialize`` while it starts, and the daemon already holds the heavy parts
(the ``mcp`` package, the guard, the store). The forwarder finds the daemon's
socket (derived from the database path), starts the daemon detached if none
answers, sends one hello line (working directory, identity, protocol), then
copies bytes both ways. Whatever ends the forwarder — a signal, EOF — ends
only this MCP session; the daemon and its running turns go on.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from worker_server import __version__

#: Version of the hello line and its answer.
PROTOCOL = 1
_SOCKET_PATH_MAX = 107
_START_TIMEOUT_S = 30.0
#: After the client closes stdin, how long answers already asked for may still arrive.
_DRAIN_S = 2.0


class ForwarderError(Exception):
    """The daemon could not be found or started."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- where things are (mirrors worker_server.config, without pydantic) -------


def _config_file(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("TASKWARDEN_CONFIG")
    if env:
        return Path(env).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for candidate in (Path.cwd() / "taskwarden.toml", config_home / "taskwarden" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def _file_values(path: Path | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # the daemon reports a bad file properly when it starts


def _setting(key: str, values: dict[str, object], default: str | None = None) -> str | None:
    env = os.environ.get(f"TASKWARDEN_{key.upper()}")
    if env:
        return env
    value = values.get(key)
    return str(value) if value is not None else default


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "taskwarden"


def is_server_url(db: str) -> bool:
    """``db`` names a PostgreSQL database (shared by daemons on many hosts), not a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def server_db_anchor(url: str, state: Path) -> Path:
    """Where this host keeps what it alone owns of a server database.

    A daemon's socket, its turns' logs and scratch directories stay per host;
    they go in a directory named by a digest of the URL, under ``state``
    (``state_dir`` in the config, else the user's state directory). The path
    returned stands where a SQLite file would: its parent is that directory.
    """
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return state.expanduser() / f"pg-{digest}" / "taskwarden.pg"


def db_target(db: str | None, values: dict[str, object]) -> str:
    """The database to open: a ``postgresql://`` URL, or the SQLite file's path."""
    chosen = db or _setting("db", values)
    if chosen and is_server_url(chosen):
        return chosen
    return str(Path(chosen).expanduser() if chosen else state_dir() / "taskwarden.db")


def db_path(db: str | None, values: dict[str, object]) -> Path:
    """The SQLite file, or for a server database this host's anchor (see ``server_db_anchor``)."""
    target = db_target(db, values)
    if is_server_url(target):
        chosen_state = _setting("state_dir", values)
        return server_db_anchor(target, Path(chosen_state) if chosen_state else state_dir())
    return Path(target)


def daemon_dir(db: Path) -> Path:
    """The daemon's private directory: beside the database, else under /tmp by a digest.

    Derived from the database path alone, like the wake-up sockets
    (guard.storage.changes), so every process on one file finds the same daemon.
    """
    resolved = db.resolve()
    beside = resolved.parent / f".{resolved.name}.daemon"
    if len(str(beside)) + 1 + len(f"{__version__}.sock") + 8 <= _SOCKET_PATH_MAX:
        return beside
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return Path("/tmp") / f"taskwarden-{os.getuid()}" / f"{digest}.daemon"


def socket_path(directory: Path, version: str | None = None) -> Path:
    return directory / f"{version or __version__}.sock"


# -- talking to the daemon -----------------------------------------------------


def connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _read_line(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """One line from ``sock`` and whatever came after it."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ForwarderError("the daemon closed the connection during the hello")
        data += chunk
        if len(data) > limit:
            raise ForwarderError("the daemon's hello answer is too long")
    line, _, rest = data.partition(b"\n")
    return line, rest


def hello(sock: socket.socket, message: dict[str, object]) -> tuple[dict[str, object], bytes]:
    sock.sendall(json.dumps({"protocol": PROTOCOL, "version": __version__, **message}).encode() + b"\n")
    line, rest = _read_line(sock)
    return json.loads(line), rest


def request(directory: Path, op: str, version: str | None = None, **fields: object) -> dict[str, object] | None:
    """A one-shot control request (status, stop, retire); None when no daemon answers."""
    sock = connect(socket_path(directory, version))
    if sock is None:
        return None
    with sock:
        try:
            answer, _ = hello(sock, {"op": op, **fields})
        except (OSError, ForwarderError, ValueError):
            return None
        return answer


def other_versions(directory: Path) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n[: -len(".sock")] for n in names if n.endswith(".sock") and n != f"{__version__}.sock")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def has_password(url: str) -> bool:
    """Whether a server database URL carries a password (which must not show in ``ps``)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    except ValueError:
        return True  # unparseable: assume the worst


def start_daemon(
    directory: Path, db: Path | str, config: Path | None, policy: str | None, log_dir: Path
) -> subprocess.Popen[bytes]:
    """Start ``taskwarden daemon run`` detached: its own session, stdio on /dev/null, log in the log dir.

    ``db``: the SQLite file, or a server database's URL (whose per-host state
    the daemon finds under ``state_dir`` as this process does). A URL with a
    password goes to the daemon in its environment, not its command line,
    which every user of the host may read.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "daemon.log"
    env = None
    argv = [sys.executable, "-m", "worker_server", "daemon", "run"]
    if isinstance(db, str) and is_server_url(db):
        if has_password(db):
            env = {**os.environ, "TASKWARDEN_DB": db}
        else:
            argv += ["--db", db]
    else:
        argv += ["--db", str(Path(db).resolve())]
    argv += ["--log-file", str(log_file.resolve())]
    if config is not None:
        argv += ["--config", str(config.resolve())]
    if policy:
        argv += ["--policy", str(Path(policy).expanduser().resolve())]
    # stderr too, for what happens before the daemon's own (rotated) log is set up.
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            close_fds=True, env=env,
        )  # fmt: skip


def daemon_socket(
    db: Path, config: Path | None, policy: str | None, log_dir: Path, timeout: float = _START_TIMEOUT_S,
    target: str | None = None,
) -> socket.socket:
    """A connection to the daemon of ``db`` (of this version), starting it if none answers.

    ``db`` is the SQLite file or, for a server database, this host's anchor
    (``server_db_anchor``): the socket lives beside it. ``target`` is what the
    daemon opens (the URL; default ``db`` itself).
    """
    directory = daemon_dir(db)
    path = socket_path(directory)
    sock = connect(path)
    if sock is not None:
        return sock
    # A daemon of an older version hands over: it exits once idle.
    for version in other_versions(directory):
        if _version_key(version) < _version_key(__version__):
            request(directory, "retire", version)
    log_file = log_dir / "daemon.log"
    try:
        seen = log_file.stat().st_size
    except OSError:
        seen = 0
    daemon = start_daemon(directory, target if target is not None else db, config, policy, log_dir)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        sock = connect(path)
        if sock is not None:
            return sock
        code = daemon.poll()
        # 3: another daemon won the race to start; its socket comes soon.
        if code is not None and code != 3:
            with open(log_file, "rb") as f:
                f.seek(seen)
                said = f.read(8192).decode(errors="replace").strip()
            raise ForwarderError(said or f"the daemon exited with {code}", code)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    raise ForwarderError(f"the daemon did not start within {timeout:.0f} s; see {log_dir / 'daemon.log'}")


# -- relaying -----------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(sock: socket.socket, early: bytes = b"") -> None:
    """Copy stdin to the socket and the socket to stdout until either side ends."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    if early:
        _write_all(stdout, early)
    reading_stdin = True
    drain_until: float | None = None
    while True:
        watch = [sock, stdin] if reading_stdin else [sock]
        timeout = None if drain_until is None else max(0.0, drain_until - time.monotonic())
        ready, _, _ = select.select(watch, [], [], timeout)
        if not ready:
            return  # the client is gone and the daemon has nothing more to say
        if sock in ready:
            data = sock.recv(1 << 16)
            if not data:
                return
            _write_all(stdout, data)
        if stdin in ready:
            data = os.read(stdin, 1 << 16)
            if data:
                sock.sendall(data)
            else:
                reading_stdin = False
                sock.shutdown(socket.SHUT_WR)
                drain_until = time.monotonic() + _DRAIN_S


def _quit(signum: int, frame: object) -> None:
    # Closing the socket (process exit) ends this session only.
    os._exit(0)


def wants_forwarder(argv: list[str]) -> bool:
    """``serve`` over stdio, not ``--http``, not ``--in-process``, not ``--help``."""
    if not argv or argv[0] != "serve":
        return False
    return not any(a in ("--in-process", "-h", "--help") or a == "--http" or a.startswith("--http=") for a in argv)


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, _quit)
    config = _config_file(_option(argv, "--config"))
    values = _file_values(config)
    target = db_target(_option(argv, "--db"), values)
    db = db_path(_option(argv, "--db"), values)
    log_dir_value = _setting("log_dir", values)
    log_dir = Path(log_dir_value).expanduser() if log_dir_value else db.parent / "logs"
    identity = _setting("identity", values) or getpass.getuser()
    try:
        sock = daemon_socket(db, config, _option(argv, "--policy"), log_dir, target=target)
        with sock:
            answer, early = hello(sock, {"op": "mcp", "cwd": os.getcwd(), "identity": identity, "pid": os.getpid()})
            if not answer.get("ok"):
                raise ForwarderError(f"the daemon refused the session: {answer.get('error')}")
            for warning in answer.get("warnings") or ():  # type: ignore[union-attr]
                print(f"taskwarden: warning: {warning}", file=sys.stderr, flush=True)
            relay(sock, early)
    except ForwarderError as exc:
        # The daemon's own message (a bad config) already names taskwarden.
        print(exc if str(exc).startswith("taskwarden:") else f"taskwarden: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, ValueError) as exc:
        print(f"taskwarden: {exc}", file=sys.stderr)
        return 1
    return 0
