"""The ``taskwarden`` command line.

Output meant for people goes to stdout (these commands never share stdout
with the MCP transport; ``serve`` writes nothing there but MCP). Logs go to
stderr.

``serve`` over stdio is the forwarder (worker_server.forwarder): ``main``
hands it over before importing anything beyond the standard library, so an
MCP client gets ``initialize`` answered by the already running daemon fast.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from worker_server import __version__, forwarder

if TYPE_CHECKING:
    from worker_server.config import Settings

logger = logging.getLogger("taskwarden")


class Parser(argparse.ArgumentParser):
    """argparse, with an error as one line naming what is wrong (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer argument with the same bounds as the tool's field."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _age(text: str) -> float:
    """``30d``, ``12h``, ``90m``: an age in seconds."""
    from guard.times import parse_duration

    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected an age such as 30d, 12h or 90m, got {text!r}")
    return seconds


def _tools_from(parser: argparse.ArgumentParser, help_text: str) -> None:
    # Everything after it is the command; main() takes it off argv before parsing.
    parser.add_argument("--tools-from", metavar="-- CMD ARGS", nargs="?", help=help_text)


def _split_tools_from(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``policy check|explain … --tools-from -- CMD ARGS``: the argv before it and the command."""
    if argv[:1] != ["policy"] or "--tools-from" not in argv:
        return argv, None
    at = argv.index("--tools-from")
    command = argv[at + 1 :]
    return argv[:at], command[1:] if command[:1] == ["--"] else command


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="config file (default: $TASKWARDEN_CONFIG, else ./taskwarden.toml, "
                        "else ~/.config/taskwarden/config.toml)")
    parser.add_argument(
        "--db", metavar="FILE|URL",
        help="SQLite file or postgresql:// URL (default: $TASKWARDEN_DB or the user state dir)",
    )  # fmt: skip


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8765), got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="taskwarden",
        description="An MCP server that hands background work to coding agents and people, behind a policy guard.",
    )
    parser.add_argument("--version", action="version", version=f"taskwarden {__version__}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)", description=(
        "Run the MCP server. With no --http it speaks MCP on stdin/stdout, as MCP clients such as "
        "Claude Code and Codex expect, relaying to the daemon of its database (started in the background "
        "when none runs), so tasks outlive the client. With --http this process is that daemon and also "
        "serves /mcp (streamable HTTP) and the inbox at /inbox."
    ))
    _common(serve)
    serve.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in policy)")
    serve.add_argument("--http", metavar="HOST:PORT", type=_host_port,
                       help="serve MCP over streamable HTTP at /mcp (and the inbox) instead of stdio")
    serve.add_argument(
        "--allow-anonymous", action="store_true", help="accept HTTP requests without a bearer token (loopback only)"
    )
    serve.add_argument("--no-inbox", action="store_true", help="with --http: do not serve the inbox at /inbox")
    serve.add_argument(
        "--in-process", action="store_true",
        help="serve stdio in this process instead of relaying to the daemon (tasks end with the client)",
    )  # fmt: skip

    daemon = sub.add_parser("daemon", help="the daemon that owns running tasks").add_subparsers(
        dest="daemon_command", required=True, metavar="ACTION"
    )
    d_run = daemon.add_parser("run", help="run the daemon of the database in the foreground", description=(
        "Run the daemon: one per database; it serves the MCP sessions that `taskwarden serve` relays and "
        "owns every running task. `serve` starts it by itself when none runs."
    ))
    _common(d_run)
    d_run.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in policy)")
    d_run.add_argument(
        "--log-file", metavar="FILE",
        help="log to FILE, rotated by size (10 MiB, 3 kept), instead of stderr; `serve` starts the daemon so",
    )  # fmt: skip
    d_status = daemon.add_parser("status", help="is the daemon running; its sessions and turns")
    _common(d_status)
    d_status.add_argument("--json", action="store_true", help="print JSON")
    d_stop = daemon.add_parser("stop", help="stop the daemon once its running turns finish")
    _common(d_stop)
    d_stop.add_argument("--now", action="store_true", help="cancel running turns (failed: interrupted) and stop at once")

    guard = sub.add_parser("guard", help="put the policy guard in front of another MCP server", description=(
        "Start another MCP server (the command after --, spoken to over stdio) or connect to one "
        "(--upstream URL), and serve it to your MCP client with every request passing the guard: "
        "hidden tools, decisions, rate limits, approvals (inbox and `taskwarden approvals` on the same "
        "database) and the audit trail. Serves stdio, or streamable HTTP with --http."
    ))
    _common(guard)
    guard.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in policy; "
                       "write a starter one with `taskwarden policy scan -- CMD`)")
    guard.add_argument("--name", default="taskwarden-guard", help="the server name our client sees")
    guard.add_argument("--upstream", metavar="URL", help="guard a streamable-HTTP MCP server instead of a command")
    guard.add_argument("--http", metavar="HOST:PORT", type=_host_port, help="serve streamable HTTP instead of stdio")
    guard.add_argument(
        "--allow-anonymous", action="store_true", help="accept HTTP requests without a bearer token (loopback only)"
    )
    guard.add_argument("--on-upstream-exit", choices=("restart", "exit"), default="restart",
                       help="when the upstream server goes away: start it again with back-off (default) or exit")
    guard.add_argument("upstream_command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                       help="the MCP server to start")

    inbox = sub.add_parser("inbox", help="serve the web inbox alone", description=(
        "Serve the web inbox for people (tasks, questions, hand-ins, approvals, audit) against the same "
        "database. Use this when the MCP server runs over stdio."
    ))
    _common(inbox)
    inbox.add_argument("--http", metavar="HOST:PORT", type=_host_port, default=("127.0.0.1", 8765),
                       help="where to listen (default 127.0.0.1:8765)")

    from worker_server.task import TaskStatus

    tasks = sub.add_parser("tasks", help="list, show and work on tasks").add_subparsers(
        dest="tasks_command", required=True, metavar="ACTION"
    )
    t_list = tasks.add_parser("list", help="list tasks, newest first")
    _common(t_list)
    t_list.add_argument("--status", choices=[s.value for s in TaskStatus], help="only tasks in this status")
    t_list.add_argument("--worker", metavar="NAME", help="only tasks of this worker (a profile name, or human)")
    t_list.add_argument("--label", help="only tasks with this label")
    t_list.add_argument("--limit", type=_bounded_int(1, 200), default=50, help="how many (1..200, default 50)")
    t_list.add_argument("--json", action="store_true", help="print JSON")
    t_show = tasks.add_parser("show", help="show one task: status, output, turns, thread, log file")
    _common(t_show)
    t_show.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    t_show.add_argument("--tail", type=_bounded_int(0, 500), default=20, help="lines of recent activity (0..500)")
    t_show.add_argument("--json", action="store_true", help="print JSON")
    t_cancel = tasks.add_parser("cancel", help="cancel tasks, as the operator (the guard decides and audits it)",
                                description=(
        "Cancel tasks through the policy guard, as you (the operator): deny rules and rate limits apply and "
        "the call is audited. A rule that requires approval is satisfied by you running this command."
    ))  # fmt: skip
    _common(t_cancel)
    t_cancel.add_argument("task_ids", metavar="ID", nargs="+", help="task ids (tsk_…), up to 100")
    t_cancel.add_argument("--reason", metavar="TEXT", help="why; shown to the worker or person")
    t_cancel.add_argument("--as", dest="as_name", metavar="NAME", help="who you are (default: the OS user)")
    t_logs = tasks.add_parser("logs", help="print a task's log (its worker's stdout and stderr)")
    _common(t_logs)
    t_logs.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    t_logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the task ends")
    t_prune = tasks.add_parser("prune", help="delete old finished sessions, their logs and worktrees",
                               description=(
        "Delete sessions whose every turn is finished (completed, failed, cancelled) and whose last change "
        "is older than --older-than: their tasks, messages, logs and git worktrees (the branches stay)."
    ))  # fmt: skip
    _common(t_prune)
    t_prune.add_argument("--older-than", required=True, type=_age, metavar="AGE",
                         help="an age such as 30d, 12h or 90m")  # fmt: skip
    t_prune.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    for name, help_text, takes_text in (
        ("claim", "claim a human task", False),
        ("release", "give a claimed human task back", False),
        ("reply", "post a message on a human task", True),
        ("ask", "ask the agent a question about a human task", True),
        ("handin", "hand in the result of a human task", True),
    ):
        p = tasks.add_parser(name, help=help_text)
        _common(p)
        p.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
        if takes_text:
            p.add_argument("text", metavar="TEXT", help="the message (Markdown)")
        p.add_argument("--as", dest="as_name", metavar="NAME", help="who you are (default: the OS user)")

    workers = sub.add_parser("workers", help="the worker profiles: is each CLI installed, its version, limits")
    _common(workers)
    workers.add_argument("--json", action="store_true", help="print JSON")

    humans = sub.add_parser("humans", help="people who work in the inbox").add_subparsers(
        dest="humans_command", required=True, metavar="ACTION"
    )
    h_add = humans.add_parser("add", help="add (or update) a person and print a one-time sign-in link")
    _common(h_add)
    h_add.add_argument("name", metavar="NAME", help="the person's name, as the inbox shows it")
    h_add.add_argument("--url", help="the inbox's address (default: that of the daemon serving HTTP for this "
                       "database, else inbox_url from the config)")
    h_add.add_argument("--role", choices=("worker", "approver", "admin"),
                       help="worker: claims tasks; approver: also decides approvals; admin: also manages people "
                            "(default for a new person: worker)")
    h_add.add_argument("--email", metavar="ADDR", help="send this person's notifications here")
    h_add.add_argument("--webhook", metavar="URL", help="POST this person's notifications here (Slack-compatible)")
    h_add.add_argument("--webhook-secret", metavar="SECRET",
                       help="the key of the X-Taskwarden-Signature HMAC (default: a new random one, printed)")
    h_add.add_argument("--as", dest="as_name", metavar="NAME", help="who you are (default: the OS user)")
    h_list = humans.add_parser("list", help="list people")
    _common(h_list)
    h_rm = humans.add_parser("remove", help="remove a person (signs them out)")
    _common(h_rm)
    h_rm.add_argument("name", metavar="NAME", help="the person's name")
    h_rm.add_argument("--as", dest="as_name", metavar="NAME", help="who you are (default: the OS user)")
    h_inbox = humans.add_parser("inbox", help="what needs a person, in the terminal")
    _common(h_inbox)

    approvals = sub.add_parser("approvals", help="decide calls the guard holds for a human").add_subparsers(
        dest="approvals_command", required=True, metavar="ACTION"
    )
    a_list = approvals.add_parser("list", help="list approvals, newest first")
    _common(a_list)
    a_list.add_argument("--json", action="store_true", help="print JSON")
    a_ok = approvals.add_parser("approve", help="approve a held call")
    _common(a_ok)
    a_ok.add_argument("approval_id", metavar="ID", help="the approval id (apr_…)")
    a_ok.add_argument("--as", dest="as_name", metavar="NAME", help="who decides (default: the OS user)")
    a_ok.add_argument("--comment", metavar="TEXT", help="a note kept with the decision")
    a_no = approvals.add_parser("deny", help="deny a held call (a reason is required)")
    _common(a_no)
    a_no.add_argument("approval_id", metavar="ID", help="the approval id (apr_…)")
    a_no.add_argument("--reason", required=True, metavar="TEXT", help="shown to the agent")
    a_no.add_argument("--as", dest="as_name", metavar="NAME", help="who decides (default: the OS user)")

    policy = sub.add_parser("policy", help="check, explain and test policy files").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION"
    )
    p_check = policy.add_parser(
        "check", help="validate a policy file; exit 1 on warnings (a name that is not a tool)",
        description="Validate a policy file and warn about every rule or hide entry that names no tool of the "
        "server (a typo guards nothing). Exit 0: valid, no warnings; 1: invalid, or valid with warnings "
        "(so a CI step fails on a typo'd tool name); 2: bad usage.",
    )  # fmt: skip
    p_check.add_argument("file", metavar="FILE", help="the policy file (YAML or JSON, any dialect)")
    _tools_from(p_check, "warn about names that are not tools of the MCP server CMD starts, "
                "instead of taskwarden's own tools")
    p_explain = policy.add_parser("explain", help="show the decision for one call and the rules behind it")
    p_explain.add_argument("file", metavar="FILE", help="the policy file")
    p_explain.add_argument("--tool", required=True, help="the tool called, e.g. spawn-task")
    p_explain.add_argument("--args", default="{}", metavar="JSON", help="the call's arguments as a JSON object")
    p_explain.add_argument("--identity", help="the caller (default: none)")
    _tools_from(p_explain, "decide as a guard in front of the MCP server CMD starts (its tools and their "
                "argument bounds) instead of taskwarden's own tools; last on the line")
    p_explain.add_argument("--policy-only", action="store_true",
                           help="the policy's rules alone: no server's tool list or argument bounds")
    _common(p_explain)
    p_test = policy.add_parser("test", help="run expected decisions from a CASES.yaml file")
    p_test.add_argument("file", metavar="FILE", help="the policy file")
    p_test.add_argument("cases", metavar="CASES.yaml", help="the cases: tool, args, identity, expect (see the README)")
    p_scan = policy.add_parser("scan", help="print a starter policy for another MCP server's tools")
    p_scan.add_argument("--upstream", metavar="URL", help="scan a streamable-HTTP MCP server instead of a command")
    p_scan.add_argument("upstream_command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                        help="the MCP server to start")

    notify = sub.add_parser("notify", help="notifications: test a person's channels, list what was sent").add_subparsers(
        dest="notify_command", required=True, metavar="ACTION"
    )
    n_test = notify.add_parser("test", help="send a test notification on each of a person's channels")
    _common(n_test)
    n_test.add_argument("name", metavar="NAME", help="the person whose channels to test")
    n_list = notify.add_parser("list", help="notifications, newest first: sent, pending, failed")
    _common(n_list)
    n_list.add_argument("--failed", action="store_true", help="only those that gave up after every retry")
    n_list.add_argument("--json", action="store_true", help="print JSON")
    n_list.add_argument("--limit", type=int, default=50, help="at most this many, newest first (1..1000; default 50)")

    budgets = sub.add_parser("budgets", help="each spend budget's use per scope key and window")
    _common(budgets)
    budgets.add_argument("--json", action="store_true", help="one JSON object per budget key")

    audit = sub.add_parser("audit", help="read the audit trail")
    _common(audit)
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument("--since", help="ISO 8601 time or an age like 10m, 2h, 1d")
    audit.add_argument("--tool", help="only calls of this tool")
    audit.add_argument("--decision", help="only this decision (allow, deny, rate_limited, approval_required, …)")
    audit.add_argument("--follow", action="store_true", help="keep printing new records")
    audit.add_argument("--limit", type=_bounded_int(1, 100_000), default=200,
                       help="the newest N records (default 200)")
    return parser


# Commands that run a server: their INFO lines (listening on…, reloaded…) are
# what an operator watches. Every other command logs warnings and errors only.
SERVERS = {"serve", "daemon", "guard", "inbox"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if forwarder.wants_forwarder(argv):
        return forwarder.main(argv)
    argv, tools_from = _split_tools_from(argv)
    args = build_parser().parse_args(argv)
    if args.command == "policy":
        args.tools_from = tools_from
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command not in SERVERS:
        logging.getLogger().setLevel(logging.WARNING)
        # The pool logs each failed connection attempt; a one-shot command says why in one line instead.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    from guard.dialects.source import PolicyError
    from guard.storage import StorageError
    from worker_server.config import ConfigError
    from worker_server.db_errors import DB_ERRORS

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # Errors raised inside a task group arrive wrapped in exception groups.
        known = _upstream_exit(exc, (ConfigError, PolicyError, CliError, StorageError, *DB_ERRORS, OSError))
        if known is None:
            if _upstream_exit(exc, KeyboardInterrupt) is not None:
                return 130
            raise
        if isinstance(known, DB_ERRORS):
            # A file that is not a database, a locked or read-only file; a server that refused.
            print(f"taskwarden: database {_db_shown(args)}: {known}", file=sys.stderr)
            return 1
        print(f"taskwarden: {known}", file=sys.stderr)
        if isinstance(known, CliError):
            return known.code
        # A database that cannot be reached or used is not a usage error.
        return 1 if isinstance(known, (OSError, StorageError)) else 2


class CliError(Exception):
    """What a command could not do, said in one line (exit ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _db_shown(args: argparse.Namespace) -> str:
    try:
        return _settings(args).db_display
    except Exception:  # noqa: BLE001 - only for a message
        return str(getattr(args, "db", None) or "(default)")


def _settings(args: argparse.Namespace, *, existing_db: bool = False, **extra: Any) -> Settings:
    """The configuration; ``existing_db``: the command reads a database and must not create one."""
    from worker_server.config import load_settings

    settings = load_settings(getattr(args, "config", None), db=getattr(args, "db", None), **extra)
    if args.command in SERVERS:
        logging.getLogger().setLevel(settings.log_level)
    elif settings.log_level == "DEBUG":
        logging.getLogger().setLevel(logging.DEBUG)
    if existing_db and not settings.db_is_server:
        _check_database(settings.db_path)
    return settings


def _check_database(path: Path) -> None:
    if path.is_dir():
        raise CliError(f"--db {path} is a directory; name the database file (e.g. {path / 'taskwarden.db'})")
    if not path.exists():
        raise CliError(
            f"no database at {path}: nothing has run with it yet (check --db, $TASKWARDEN_DB or db in the config)"
        )
    try:
        with path.open("rb") as f:
            header = f.read(16)
    except OSError as exc:
        raise CliError(f"cannot read the database {path}: {exc.strerror}") from None
    if header and header != b"SQLite format 3\x00":
        raise CliError(f"{path} is not a taskwarden database (not an SQLite file)")


def _run(fn: Callable[[], Awaitable[int]]) -> int:
    import anyio

    return anyio.run(fn)


# Commands by which a person decides or acts as a person: never from inside a worker turn.
PERSON_ONLY = {
    ("approvals", "approve"), ("approvals", "deny"),
    ("humans", "add"), ("humans", "remove"),
    ("tasks", "claim"), ("tasks", "release"), ("tasks", "reply"), ("tasks", "ask"), ("tasks", "handin"),
    # Channels carry secrets and decision links: nothing a worker may read or send.
    ("notify", "test"), ("notify", "list"),
}  # fmt: skip
EXIT_INSIDE_TURN = 3


def _dispatch(args: argparse.Namespace) -> int:
    import anyio

    from guard import commands, policy_cli
    from worker_server.config import ConfigError

    action = getattr(args, f"{args.command}_command", None)
    if (args.command, action) in PERSON_ONLY:
        from worker_server.turn_origin import enclosing_turn, refusal

        turn = enclosing_turn()
        if turn is not None:
            print(f"taskwarden: {refusal(turn)}", file=sys.stderr)
            return EXIT_INSIDE_TURN

    if args.command == "daemon":
        return _daemon(args)
    if args.command == "serve":
        from worker_server.server import serve_http, serve_stdio

        settings = _settings(args, policy=args.policy)
        if args.in_process and args.http:
            raise ConfigError("--in-process only applies to stdio, not with --http")
        if args.http:
            from worker_server.daemon import run_daemon
            from worker_server.server import bind_listener, check_http, serve_http_app

            host, port = args.http
            check_http(settings, host, allow_anonymous=args.allow_anonymous)
            sock = bind_listener(host, port)
            url = f"http://{_url_host(host)}:{port}"
            # The daemon of the database, with an HTTP listener: stdio clients
            # share it. Another daemon already serves the database: HTTP alone.
            code = anyio.run(lambda: run_daemon(settings, lambda app: serve_http_app(
                app, host, port, allow_anonymous=args.allow_anonymous, with_inbox=not args.no_inbox, sock=sock),
                http_url=None if args.no_inbox else f"{url}/inbox"))
            if code == 3:
                anyio.run(lambda: serve_http(settings, host, port, allow_anonymous=args.allow_anonymous,
                                             with_inbox=not args.no_inbox, sock=sock))
        else:
            if args.allow_anonymous:
                raise ConfigError("--allow-anonymous only applies with --http")
            anyio.run(serve_stdio, settings)
        return 0
    if args.command == "guard":
        return _guard(args)
    if args.command == "inbox":
        from worker_server.server import bind_listener, serve_inbox

        settings = _settings(args)
        host, port = args.http
        sock = bind_listener(host, port)
        anyio.run(serve_inbox, settings, host, port, sock)
        return 0
    if args.command == "tasks":
        settings = _settings(args, existing_db=True)
        return _run(lambda: _tasks(args, settings))
    if args.command == "workers":
        from worker_server.workers import print_workers

        return print_workers(_settings(args), as_json=args.json, out=sys.stdout)
    if args.command == "humans":
        settings = _settings(args, existing_db=args.humans_command != "add")
        return _run(lambda: _humans(args, settings))
    if args.command == "notify":
        return _run(lambda: _notify(args, _settings(args, existing_db=True)))
    if args.command == "approvals":
        db = _settings(args, existing_db=True).db_target
        if args.approvals_command == "list":
            return _run(lambda: commands.approvals_list(db, args.json, sys.stdout))
        from worker_server.inbox.accounts import role_of

        who = args.as_name or getpass.getuser()
        if args.approvals_command == "approve":
            return _run(lambda: commands.approvals_approve(
                db, args.approval_id, who, args.comment, sys.stdout, role_of=role_of))
        return _run(lambda: commands.approvals_deny(
            db, args.approval_id, args.reason, sys.stdout, by=who, role_of=role_of))
    if args.command == "policy":
        if args.policy_command == "check":
            schemas, server = _tool_schemas(args)
            return policy_cli.check(args.file, tools=set(schemas), server=server)
        if args.policy_command == "scan":
            from guard.scan import scan
            from guard.upstream import UpstreamExited

            try:
                text = anyio.run(scan, _upstream_target(args))
            except BaseException as exc:
                exited = _upstream_exit(exc, UpstreamExited)
                if exited is None:
                    raise
                print(f"taskwarden policy scan: {exited}", file=sys.stderr)
                return 1
            print(text, end="")
            return 0
        if args.policy_command == "explain":
            try:  # budget use is shown when there is a database to read it from
                db_path = _settings(args).db_path
            except ConfigError:
                db_path = None
            if args.policy_only and args.tools_from is not None:
                raise CliError("give --policy-only or --tools-from, not both", 2)
            schemas = None if args.policy_only else _tool_schemas(args)[0]
            return policy_cli.explain(args.file, args.tool, args.args, args.identity, db_path=db_path, schemas=schemas)
        return policy_cli.test(args.file, args.cases)
    if args.command == "budgets":
        db = _settings(args, existing_db=True).db_target
        return _run(lambda: commands.budgets(db, args.json, sys.stdout))
    if args.command == "audit":
        db = _settings(args, existing_db=True).db_target
        return _run(
            lambda: commands.audit(
                db, args.json, args.since, args.tool, args.decision, args.follow, sys.stdout, limit=args.limit
            )
        )
    raise AssertionError(args.command)


def _tool_schemas(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The input schema of each tool of the server a policy guards, and that server's name:
    taskwarden's own, or (``--tools-from -- CMD``) those of the MCP server CMD starts."""
    import anyio

    if args.tools_from is None:
        from worker_server.tools import input_schemas

        return input_schemas(), "taskwarden"
    command = args.tools_from
    if not command:
        raise CliError("--tools-from needs the MCP server's command: --tools-from -- CMD ARGS", 2)
    from guard.scan import list_tools
    from guard.upstream import StdioTarget, UpstreamExited

    target = StdioTarget(command[0], tuple(command[1:]), env=dict(os.environ))
    try:
        tools = anyio.run(lambda: list_tools(target))
    except BaseException as exc:
        exited = _upstream_exit(exc, UpstreamExited)
        if exited is None:
            raise
        raise CliError(f"--tools-from: {exited}") from None
    return {t.name: t.input_schema for t in tools}, target.describe()


def _url_host(host: str) -> str:
    """``host`` as people reach it in a link (a wildcard address by the machine's name)."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _upstream_target(args: argparse.Namespace) -> Any:
    from guard.upstream import HttpTarget, StdioTarget
    from worker_server.config import ConfigError

    command = list(args.upstream_command)
    if command and command[0] == "--":
        command = command[1:]
    if args.upstream and command:
        raise ConfigError("give either --upstream URL or -- CMD ARGS, not both")
    if args.upstream:
        return HttpTarget(args.upstream)
    if not command:
        raise ConfigError("name the MCP server to guard: -- CMD ARGS (or --upstream URL)")
    # The whole environment: a server wrapped in an MCP client's config gets its
    # API keys from the `env` given to the guard (the SDK would pass only a few).
    return StdioTarget(command[0], tuple(command[1:]), env=dict(os.environ))


def _guard(args: argparse.Namespace) -> int:
    import anyio

    from guard.proxy import run_guard
    from worker_server.config import ConfigError
    from guard.upstream import RestartPolicy, UpstreamExited
    from worker_server.identity import CallerResolver, TokenIdentities
    from worker_server.server import _is_loopback, _rebinding_guard, bind_listener

    target = _upstream_target(args)
    settings = _settings(args, policy=args.policy)
    token_verifier = None
    security = None
    sock = None
    if args.http:
        host, _port = args.http
        if args.allow_anonymous and not _is_loopback(host):
            raise ConfigError(f"--allow-anonymous is only allowed on a loopback address, not {host}")
        if not args.allow_anonymous:
            if not settings.identities:
                raise ConfigError(
                    "HTTP needs bearer tokens: add [identities.NAME] token_sha256 = \"...\" to the config, "
                    "or listen on 127.0.0.1 with --allow-anonymous"
                )
            token_verifier = TokenIdentities(settings.identities)
        security = _rebinding_guard(host)
        # Bound before the upstream starts: a port that is taken is one line, exit 2.
        sock = bind_listener(host, _port)
    elif args.allow_anonymous:
        raise ConfigError("--allow-anonymous only applies with --http")
    try:
        anyio.run(lambda: run_guard(
            target,
            db_path=settings.db_target,
            policy_path=settings.policy,
            name=args.name,
            callers=CallerResolver(settings.identity).caller,
            restart=RestartPolicy(restart=args.on_upstream_exit == "restart"),
            http=args.http,
            token_verifier=token_verifier,
            transport_security=security,
            sock=sock,
        ))
    except BaseException as exc:
        exited = _upstream_exit(exc, UpstreamExited)
        if exited is None:
            raise
        print(f"taskwarden guard: {exited}", file=sys.stderr)
        return 1
    return 0


def _upstream_exit(
    exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The ``kind`` error inside task-group exception groups, if that is what ended the run."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _upstream_exit(inner, kind)
            if found is not None:
                return found
    return None


def _daemon(args: argparse.Namespace) -> int:
    import json

    if args.daemon_command == "run":
        import anyio

        from worker_server.daemon import run_daemon

        settings = _settings(args, policy=args.policy)
        if args.log_file:
            from pathlib import Path

            from worker_server.daemon_log import log_to

            log_to(Path(args.log_file).expanduser())
        return anyio.run(run_daemon, settings)
    settings = _settings(args)
    directory = forwarder.daemon_dir(settings.db_path)
    if args.daemon_command == "status":
        answer = forwarder.request(directory, "status")
        if answer is None:
            # No daemon here; on a server database the others may still be seen.
            others = _run(lambda: _registered_daemons(settings)) if settings.db_is_server else []
            if args.json:
                print(json.dumps({"running": False, **({"daemons": others} if settings.db_is_server else {})}))
            else:
                print("No daemon is running for this database" + (" on this host." if settings.db_is_server else "."))
                _print_daemons(others)
            return 1
        if args.json:
            print(json.dumps({"running": True, **{k: v for k, v in answer.items() if k != "ok"}}))
        else:
            print(f"daemon pid {answer['pid']}, taskwarden {answer['version']}, up {answer['uptime_s']} s")
            print(f"  sessions: {answer['sessions']}   turns running: {answer['running_turns']}   queued: {answer['queued_turns']}")
            print(f"  database: {answer['database']}")
            if answer.get("draining"):
                print("  stopping: waiting for running turns")
            _print_daemons([d for d in answer.get("daemons") or () if not d.get("this")])
        return 0
    answer = forwarder.request(directory, "stop", now=args.now)
    if answer is None:
        print("No daemon is running for this database.")
        return 0
    print(f"daemon pid {answer['pid']}: " + ("stopping now" if args.now else "stopping once its turns finish"))
    return 0


async def _registered_daemons(settings: Settings) -> list[dict[str, Any]]:
    from guard.storage import open_database
    from guard.storage.lease import DaemonRegistry

    db = await open_database(settings.db_target)
    try:
        registry = DaemonRegistry(db)
        await registry.migrate()
        now, records = await registry.all()
        return [r.describe(now) for r in records]
    finally:
        await db.close()


def _print_daemons(daemons: Sequence[dict[str, Any]]) -> None:
    """The other daemons on the database: host, pid, last renewal, lease."""
    if not daemons:
        return
    print(f"  other daemons on this database: {len(daemons)}")
    for d in daemons:
        lease = f"lease {d['lease_left_s']:.1f} s left" if d["live"] else f"LAPSED {-d['lease_left_s']:.1f} s ago"
        where = f"  {d['url']}" if d.get("url") else ""
        print(f"    {d['host']} pid {d['pid']} (taskwarden {d['version']}): renewed {d['renewed_s_ago']:.1f} s ago,"
              f" {lease}{where}")


async def _tasks(args: argparse.Namespace, settings: Settings) -> int:
    from worker_server.app import open_app
    from worker_server.service import InvalidArgument

    async with open_app(settings, run_workers=False, background=False) as app:
        service = app.service
        try:
            if args.tasks_command == "list":
                page = await service.list(status=args.status, worker=args.worker, label=args.label, limit=args.limit)
                if args.json:
                    print(page.model_dump_json(indent=2))
                else:
                    _print_task_table(page.tasks)
                return 0
            if args.tasks_command == "show":
                detail = await service.get(args.task_id, tail_lines=args.tail)
                if args.json:
                    print(detail.model_dump_json(indent=2))
                else:
                    _print_task(detail, await service.log_path(args.task_id))
                return 0
            if args.tasks_command == "cancel":
                return await _cancel(app, args)
            if args.tasks_command == "logs":
                return await _logs(app, args.task_id, follow=args.follow)
            if args.tasks_command == "prune":
                return await _prune(app, args.older_than, dry_run=args.dry_run)
            humans = service.humans
            assert humans is not None
            who = args.as_name or getpass.getuser()
            if args.tasks_command == "claim":
                row = await humans.claim(who, args.task_id)
            elif args.tasks_command == "release":
                row = await humans.release(who, args.task_id)
            elif args.tasks_command == "reply":
                await humans.reply(who, args.task_id, args.text)
                row = await app.store.get(args.task_id)
            elif args.tasks_command == "ask":
                row = await humans.ask(who, args.task_id, args.text)
            else:
                row = await humans.handin(who, args.task_id, args.text)
            print(f"{row.id}: {row.status.value}")
            return 0
        except InvalidArgument as exc:
            print(f"taskwarden: {exc}", file=sys.stderr)
            return 1


async def _cancel(app: Any, args: argparse.Namespace) -> int:
    """``tasks cancel``: the call an agent would make, decided by the guard, with you as the caller.

    A rule that requires approval is satisfied by the person running the
    command (it is refused inside a worker's turn): the approval is recorded
    as decided by them, then used by this very call.
    """
    from guard.audit import Outcome
    from guard.decision import decide, fresh_counters
    from guard.outcomes import Refusal
    from guard.redaction import redact_off_loop
    from guard.gate import Call, UnknownTool
    from worker_server.server import build_mcp

    who = args.as_name or getpass.getuser()
    ids = list(args.task_ids)
    arguments: dict[str, Any] = {"task_id": ids if len(ids) > 1 else ids[0]}
    if args.reason:
        arguments["reason"] = args.reason
    guard = app.guard
    build_mcp(app)  # the guard learns the tools' schemas from the server, as when it serves
    call = Call("cancel-task", arguments, identity=who, session="cli")
    verdict = decide(guard.policy, call.tool, arguments, who, fresh_counters)
    if verdict.action == "require_approval" and not await app.service.cancels_nothing(ids):
        digest = await guard.approvals.digest(call.tool, dict(arguments), who)
        approval = await guard.approvals.open(
            digest, call.tool, await redact_off_loop(dict(arguments)), who, call.session, verdict.rule_id,
            verdict.reason, (verdict.approval.expires_s if verdict.approval else 900),
        )  # fmt: skip
        await guard.approvals.decide(approval.id, True, who, "approved by running `taskwarden tasks cancel`")
    try:
        admission = await guard.admit(call)
    except UnknownTool:
        raise CliError("cancel-task is hidden by the policy") from None
    if isinstance(admission, Refusal):
        raise CliError(admission.first_line())
    try:
        result = await app.service.cancel(ids, args.reason or f"cancelled by {who} from the command line")
    except BaseException:
        await guard.settle(admission, Outcome.ERROR)
        raise
    await guard.settle(admission, Outcome.OK)
    for name, label in (("cancelled", "cancelled"), ("already_terminal", "already finished"),
                        ("not_found", "not found")):  # fmt: skip
        for task_id in getattr(result, name):
            print(f"{task_id}: {label}")
    return 1 if result.not_found else 0


async def _logs(app: Any, task_id: str, *, follow: bool) -> int:
    """Print the task's log; with ``follow``, keep printing until the task has ended."""
    import anyio

    path = await app.service.log_path(task_id)
    out = sys.stdout.buffer
    offset = 0
    while True:
        since = app.feed.generation
        if path is None:
            path = await app.service.log_path(task_id)
        if path is not None and path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    out.write(chunk)
                    offset += len(chunk)
            out.flush()
        row = await app.store.get(task_id)
        if not follow or row.terminal:
            if path is None and not follow:
                print(f"({task_id} has no log yet: it is {row.status.value})", file=sys.stderr)
            return 0
        # Woken by any change to the database (a finished turn), else read again soon.
        with anyio.move_on_after(0.5):
            await app.feed.wait(since, 0.5)


async def _prune(app: Any, older_than_s: float, *, dry_run: bool) -> int:
    from worker_server import git_work

    before = app.store.clock.now() - older_than_s
    pruned = await app.store.prune(before, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for session in pruned:
        if not dry_run:
            for log in session.log_paths:
                Path(log).unlink(missing_ok=True)
            if session.worktree and session.cwd:
                # The branch stays: it may hold the session's commits.
                await git_work.remove_worktree(session.cwd, session.worktree, "")
        extra = f", worktree {session.worktree}" if session.worktree else ""
        print(f"{verb} session {session.id}: {len(session.task_ids)} task(s), "
              f"{len(session.log_paths)} log(s){extra}")  # fmt: skip
    if not pruned:
        print("Nothing to prune: no finished session is that old.")
    return 0


async def _humans(args: argparse.Namespace, settings: Settings) -> int:
    from worker_server.inbox.accounts import Accounts, InvalidChannel, InvalidName
    from worker_server.app import open_app

    async with open_app(settings, run_workers=False, background=False) as app:
        accounts = Accounts(app.db, app.store.clock)
        if args.humans_command in ("add", "remove"):
            # Admins manage people; a name that is nobody's is the operator at the terminal.
            me = args.as_name or getpass.getuser()
            my_role = await accounts.role_of(me)
            if my_role is not None and my_role != "admin":
                print(f"taskwarden: {me} is a(n) {my_role}; only an admin (or the operator) manages people",
                      file=sys.stderr)  # fmt: skip
                return 1
        if args.humans_command == "add":
            base, source = _inbox_address(args, settings)
            try:
                link = await accounts.add(
                    args.name, base_url=base, role=args.role, email=args.email,
                    webhook=args.webhook, webhook_secret=args.webhook_secret,
                )
            except (InvalidName, InvalidChannel) as exc:
                print(f"taskwarden: {exc}", file=sys.stderr)
                return 2
            person = await accounts.person(args.name)
            assert person is not None
            print(f"Sign-in link for {person.name} ({person.role}; works once, for 7 days; {source}):\n{link}")
            if args.webhook:
                print(f"Webhook {person.webhook}: requests carry X-Taskwarden-Signature: sha256=HMAC-SHA256 "
                      f"of the body with this secret:\n{person.webhook_secret}")  # fmt: skip
            return 0
        if args.humans_command == "list":
            people = await accounts.list()
            if not people:
                print("No people yet; add one with: taskwarden humans add NAME")
            for human in people:
                channels = ", ".join(x for x in (human.email, human.webhook and "webhook") if x) or "no channels"
                print(f"{human.name}\tadded {human.created_at}\t"
                      f"{'signed in' if human.signed_in else 'not signed in'}\t{human.role}\t{channels}")  # fmt: skip
            return 0
        if args.humans_command == "remove":
            if await accounts.remove(args.name):
                print(f"Removed {args.name}; their sign-in links and sessions no longer work.")
                return 0
            print(f"taskwarden: no person named {args.name!r}", file=sys.stderr)
            return 1
        from worker_server.inbox.views import needs_person

        items = await needs_person(app)
        if not items:
            print("Nothing needs a person right now.")
        for line in items:
            print(line)
        return 0


async def _notify(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from guard.storage.clock import iso
    from worker_server.notify.channels import DeliveryError
    from worker_server.notify.outbox import Notification, Status
    from worker_server.app import open_app

    async with open_app(settings, run_workers=False, background=False) as app:
        deliverer = app.deliverer
        if args.notify_command == "list":
            if not 1 <= args.limit <= 1000:
                print("taskwarden: --limit: must be 1..1000", file=sys.stderr)
                return 2
            items = await deliverer.outbox.list(failed_only=args.failed, limit=args.limit)
            if args.json:
                print(json.dumps([n.to_dict() for n in items], ensure_ascii=False, indent=2))
                return 0
            if not items:
                print("No failed notifications." if args.failed else "No notifications yet.")
            for n in items:
                when = iso(n.sent_at) if n.status is Status.SENT else f"next {iso(n.next_at)}"
                if n.status is Status.FAILED:
                    when = "gave up"
                error = f"  last error: {n.last_error}" if n.last_error and n.status is not Status.SENT else ""
                print(f"{n.id}  {n.status.value:<7}  {n.kind:<19} {n.recipient} by {n.channel} ({n.target})  "
                      f"attempts {n.attempts}, {when}{error}")  # fmt: skip
            return 0
        from worker_server.inbox.accounts import Accounts

        person = await Accounts(app.db, app.store.clock).person(args.name)
        if person is None:
            print(f"taskwarden: no person named {args.name!r}", file=sys.stderr)
            return 1
        channels = [(c, t) for c, t in (("email", person.email), ("webhook", person.webhook)) if t]
        if not channels:
            print(f"{person.name} has no channels; add one with: taskwarden humans add {person.name} "
                  "--email ADDR or --webhook URL", file=sys.stderr)  # fmt: skip
            return 1
        now = app.store.clock.now()
        failed = 0
        for channel, target in channels:
            test = Notification(
                id="ntf_test", event_key="test", kind="test", recipient=person.name, channel=channel, target=target,
                payload={"title": "taskwarden test notification", "recipient": person.name,
                         "text": f"This is a test for {person.name}; nothing needs doing.",
                         "link": settings.inbox_url.rstrip("/") + "/"},
                status=Status.PENDING, attempts=0, next_at=now, last_error=None, created_at=now, sent_at=None,
            )  # fmt: skip
            try:
                await deliverer.send(test, person.webhook_secret if channel == "webhook" else None)
            except DeliveryError as exc:
                failed += 1
                print(f"{channel} {target}: failed: {exc}")
            else:
                print(f"{channel} {target}: sent")
        return 1 if failed else 0
def _inbox_address(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """Where the inbox is, and how we know: --url, the running daemon's HTTP address, else inbox_url."""
    if args.url:
        return args.url, "address from --url"
    answer = forwarder.request(forwarder.daemon_dir(settings.db_path), "status")
    if answer is not None and isinstance(answer.get("inbox_url"), str):
        return str(answer["inbox_url"]), f"the inbox of the running daemon, pid {answer.get('pid')}"
    why = "no daemon runs for this database" if answer is None else "its daemon serves no inbox over HTTP"
    return settings.inbox_url, f"inbox_url from the config: {why}"


def _print_task_table(tasks: Sequence[Any]) -> None:
    if not tasks:
        print("No tasks.")
        return
    print(f"{'TASK':<{len(tasks[0].task_id)}}  {'STATUS':<15} {'WORKER':<8} {'CREATED':<20}  {'USAGE':<22}  TITLE")
    for t in tasks:
        print(f"{t.task_id}  {t.status.value:<15} {t.worker:<8} {t.created_at:<20}  {_usage_brief(t.usage):<22}  {t.title}")


def _usage_brief(usage: Any) -> str:
    """``12.3k tok $0.0123 41s``: what a turn cost at a glance ("-" before it ran)."""
    if usage is None:
        return "-"
    parts = []
    tokens = (usage.input_tokens or 0) + (usage.output_tokens or 0)
    if usage.input_tokens is not None or usage.output_tokens is not None:
        parts.append(f"{tokens / 1000:.1f}k tok" if tokens >= 1000 else f"{tokens} tok")
    if usage.cost_usd is not None:
        parts.append(f"${usage.cost_usd:.4f}")
    if usage.worker_s is not None:
        parts.append(f"{usage.worker_s:.0f}s")
    return " ".join(parts) or "-"


def _usage_full(usage: Any) -> str:
    fields = usage.model_dump()
    return ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None) or "not reported"


def _print_task(d: Any, log_file: Path | None = None) -> None:
    print(f"{d.task_id}  {d.title}")
    print(f"  status:   {d.status.value}" + (f" ({d.status_message})" if d.status_message else ""))
    print(f"  worker:   {d.worker} ({d.kind})   session: {d.session_id}   turn {d.turn}")
    print(f"  created:  {d.created_at}   updated: {d.updated_at}")
    if d.options:
        print("  options:  " + ", ".join(f"{k} {v}" for k, v in d.options.items()))
    if d.worktree:
        print(f"  worktree: {d.worktree} (branch {d.branch})")
    if d.usage:
        print(f"  usage:    {_usage_full(d.usage)}")
    if d.session_usage and len(d.turns) > 1:
        print(f"  session:  {_usage_full(d.session_usage)}")
    if d.changes:
        more = " (more not listed)" if d.changes.truncated else ""
        print(f"  changes:  {len(d.changes.files)} file(s), +{d.changes.insertions} -{d.changes.deletions}{more}")
        for f in d.changes.files:
            counts = f"+{f.insertions} -{f.deletions}" if f.insertions is not None else "binary"
            print(f"    {f.status:<9} {f.path}  {counts}")
    if d.pending:
        print(f"  pending {d.pending.kind}: {d.pending.text}")
    if d.output.final:
        print("  final:\n" + _indent(d.output.final))
    if d.output.tail:
        print("  recent activity:\n" + _indent(d.output.tail))
    if len(d.turns) > 1:
        print("  turns:")
        for turn in d.turns:
            print(f"    {turn.turn}. {turn.task_id} {turn.status.value}  {turn.prompt[:60]!r}")
    if d.thread:
        print("  thread:")
        for m in d.thread:
            print(f"    [{m.created_at}] {m.author}{'/' + m.author_name if m.author_name else ''} ({m.kind}): {m.body}")
    print(f"  log: {log_file or '(none yet: the turn has not started)'}  ({d.output.log_uri})")
    print(f"  next: {d.next_action}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
