"""Runs agent turns: a queue per worker profile, processes, timeouts, cancels, restarts.

One Runner per server process. Queued turns are claimed from the store
whenever something changes (a spawn, a finished turn, another process's
write), up to each profile's ``max_concurrent`` across every server sharing
the database. Each turn is one process group whose output streams to a log
file; its end is written to the store, which wakes whoever waits on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup

from guard.budgets import BudgetLedger, BudgetTarget
from guard.storage.changes import ChangeFeed
from guard.storage.database import is_server_url
from worker_server import git_work
from worker_server import usage as usage_
from worker_server.budget_meter import TurnMeter
from worker_server.db_errors import DB_ERRORS
from worker_server.event_formats import EventReader, WorkerEvent, reader_for
from worker_server.hosts import INTERRUPTED, Liveness, ProcessLiveness, current_owner, owner_alive  # noqa: F401 (re-exported)
from worker_server.process_group import HELPER_ENV, MARKER_ENV, terminate
from worker_server.profiles import WorkerProfile
from worker_server.sandbox import Sandbox, SandboxError, state_paths
from worker_server.store import Store, TaskRow
from worker_server.task import TaskStatus
from worker_server.turn_output import TAIL_LINES, LineSplitter, LogFile, OutputPump, Tail, append_note

logger = logging.getLogger(__name__)

# How often the latest activity line is written through to the store while a
# turn runs (other processes read it from there; this process reads memory).
ACTIVITY_FLUSH_S = 1.0
# After the worker exits, how long its pipes may take to drain (a grandchild
# that inherited stdout can hold it open).
DRAIN_S = 2.0

#: What a worker never inherits from the daemon's environment (a profile's env may still set it).
WORKER_ENV_HIDDEN = ("TASKWARDEN_DB", "PGPASSWORD")
# While the database cannot be written (a full disk), how often to try again.
RETRY_S = 1.0
RETRY_MAX_S = 10.0


@dataclass
class RunningTurn:
    task: TaskRow
    started: float = field(default_factory=time.monotonic)
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)
    cancel_reason: str | None = None
    # Stopped by the server shutting down rather than by cancel-task.
    interrupted: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    activity: str | None = None
    tail: Tail = field(default_factory=Tail)
    # The worker's usage so far, as its events reported it.
    usage: dict | None = None
    # Set when the turn is stopped because it failed (a budget ran out),
    # not because someone cancelled it: it ends failed with this message.
    failure: str | None = None
    # The worker process, once started.
    pid: int | None = None

    def stop_failed(self, message: str) -> None:
        if self.cancel_reason is None:
            self.failure = message
        self.request_cancel(message)

    def request_cancel(self, reason: str, *, interrupted: bool = False) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.interrupted = interrupted
        self.cancel_requested.set()


class Runner:
    def __init__(
        self,
        store: Store,
        feed: ChangeFeed,
        profiles: dict[str, WorkerProfile],
        logs_dir: Path,
        reconcile_s: float = 30.0,
        budgets: BudgetLedger | None = None,
        sandbox: Sandbox | None = None,
        scratch_dir: Path | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.store = store
        # Whether another turn's owner is alive: its process (SQLite), its lease (a server database).
        self.liveness: Liveness = liveness or ProcessLiveness()
        self.sandbox = sandbox or Sandbox(backend="none")
        self.scratch_dir = scratch_dir or logs_dir.parent / "scratch"
        self.reconcile_s = reconcile_s
        self.feed = feed
        self.profiles = profiles
        self.logs_dir = logs_dir
        self.owner = current_owner()
        # Where turns' usage is charged (the guard's ledger); None: not metered.
        self.budgets = budgets
        self._running: dict[str, RunningTurn] = {}
        self._tg: TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle what a server that is gone left behind (at start, then every ``reconcile_s``).

        A turn still ``working`` whose server is gone fails as interrupted
        (``liveness.lost_message``); a daemon on its host also kills its whole
        process tree. Its session keeps the worker's session id so the next
        message resumes it. Queued turns of a dead server become anyone's to run.
        """
        verdicts: dict[tuple[int | None, float | None], bool] = {}

        async def alive(owner: tuple[int | None, float | None]) -> bool:
            if owner == self.owner:
                return True
            if owner not in verdicts:
                verdicts[owner] = await self.liveness.alive(owner)
            return verdicts[owner]

        lost = self.liveness.lost_message
        for task in await self.store.working_agent_tasks():
            owner = (task.owner_pid, task.owner_started)
            if await alive(owner):
                continue
            here = await self.liveness.on_this_host(owner)
            logger.warning("task %s was running under a server that is gone (pid %s%s); marking it failed (%s)",
                           task.id, task.owner_pid, "" if here else ", another host", lost)  # fmt: skip
            await stop_orphan(self.store, task, TaskStatus.FAILED, lost, kill=here)
        dead = [o for o in await self.store.queued_owners() if not await alive(o)]
        if dead:
            adopted = await self.store.adopt_queued(dead)
            logger.info("took over %d queued task(s) from a stopped server", adopted)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Schedule turns until cancelled; on the way out, stop every running turn."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                checked = time.monotonic()
                while True:
                    since = self.feed.generation
                    try:
                        await self._honour_cancel_requests()
                        await self.schedule()
                        # Now and then, look for servers sharing the database that
                        # died, leaving turns "working" and their slots taken.
                        if time.monotonic() - checked >= self.reconcile_s:
                            checked = time.monotonic()
                            await self.reconcile()
                            continue
                    except Exception as exc:
                        # A database that cannot be written (a full disk) stops
                        # scheduling for a while, never the server.
                        logger.error("scheduling failed: %s; trying again in %.0f s", exc, RETRY_S)
                        await anyio.sleep(RETRY_S)
                        continue
                    # Woken by any write to the database, here or elsewhere.
                    await self.feed.wait(since, timeout=checked + self.reconcile_s - time.monotonic())
            finally:
                with anyio.CancelScope(shield=True):
                    await self._stop_all("interrupted: server stopped")
                self._tg = None

    async def give_up(self, reason: str) -> None:
        """Stop every running turn (they end failed with ``reason``): this daemon's lease lapsed."""
        await self._stop_all(reason)

    async def _stop_all(self, reason: str) -> None:
        turns = list(self._running.values())
        for turn in turns:
            turn.request_cancel(reason, interrupted=True)
        with anyio.move_on_after(10):
            for turn in turns:
                await turn.done.wait()

    # -- scheduling --------------------------------------------------------

    async def schedule(self) -> None:
        if self._tg is None:
            return
        for worker in await self.store.queued_workers():
            profile = self.profiles.get(worker)
            while True:
                limit = profile.max_concurrent if profile else 1
                task = await self.store.claim_next(worker, limit, self.owner)
                if task is None:
                    break
                turn = RunningTurn(task)
                self._running[task.id] = turn
                self._tg.start_soon(self._run_turn, turn)

    async def _honour_cancel_requests(self) -> None:
        if not self._running:
            return  # nothing here to cancel: spare the read on every change
        for task in await self.store.cancel_requests(self.owner):
            turn = self._running.get(task.id)
            if turn is not None:
                turn.request_cancel(task.cancel_reason or "cancelled")

    def _worker_pids(self, but: str) -> set[int]:
        """The worker processes of the other running turns: never another turn's escapees."""
        return {t.pid for t in self._running.values() if t.pid is not None and t.task.id != but}

    @property
    def running_count(self) -> int:
        return len(self._running)

    def running(self, task_id: str) -> RunningTurn | None:
        return self._running.get(task_id)

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Stop a turn running in this process and wait until it is cancelled."""
        turn = self._running.get(task_id)
        if turn is None:
            return False
        turn.request_cancel(reason)
        await turn.done.wait()
        return True

    # -- one turn ----------------------------------------------------------

    async def _run_turn(self, turn: RunningTurn) -> None:
        task = turn.task
        try:
            # A turn ends only through its own cancel event (which stops its
            # processes and records why), never by having its task cancelled
            # half-way; server shutdown goes through _stop_all.
            with anyio.CancelScope(shield=True):
                await self._execute(turn)
        except Exception as exc:
            logger.exception("task %s: the runner failed", task.id)
            # A full disk (the log, the database) fails this turn, not the daemon.
            await self._record_failure(task.id, _failure_cause(exc))
        finally:
            # The store write that ended the turn already woke the scheduler
            # (slots are counted in the store): nothing more to announce.
            self._running.pop(task.id, None)
            turn.done.set()

    async def _record_failure(self, task_id: str, message: str) -> None:
        """End the turn failed; while the database cannot be written, keep trying."""
        delay = RETRY_S
        while True:
            try:
                await self.store.finish(task_id, TaskStatus.FAILED, message=message)
                return
            except Exception as exc:
                logger.error("task %s: could not record that it failed (%s); trying again in %.0f s", task_id, exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _execute(self, turn: RunningTurn) -> None:
        task = turn.task
        profile = self.profiles.get(task.worker)
        if profile is None:
            await self.store.finish(task.id, TaskStatus.FAILED, message=f"unknown worker {task.worker!r}")
            return
        cwd = task.run_dir or os.getcwd()
        argv = profile.argv(cwd=cwd, prompt=task.prompt, session=task.worker_session, options=task.options)
        env = {**os.environ, **profile.env, MARKER_ENV: task.id}
        env.pop(HELPER_ENV, None)  # a worker is never the server's helper
        for name in WORKER_ENV_HIDDEN:
            # A server database's URL (and its password) would let a worker
            # reach the database the sandbox hides, and decide approvals.
            if name != "TASKWARDEN_DB" or is_server_url(env.get(name)):
                env.pop(name, None)
        env.update({k: v for k, v in profile.env.items() if k in WORKER_ENV_HIDDEN})  # asked for by name
        log = LogFile(self.logs_dir / f"{task.id}.log")
        # The work tree before the turn, to tell what the turn changed.
        before = await git_work.snapshot(cwd) if Path(cwd).is_dir() else None
        started = time.time()  # whatever this turn starts is created after this
        scratch: Path | None = None
        try:
            # Inside the sandbox bwrap itself always starts: say what is missing here.
            if not Path(cwd).is_dir():
                message = f"cwd {cwd!r} does not exist"
            elif shutil.which(argv[0], path=env.get("PATH")) is None:
                message = f"worker binary not found: {argv[0]!r} (is it installed and on PATH?)"
            else:
                message = None
            if message is None and self.sandbox.enabled:
                scratch = self.scratch_dir / task.id
                try:
                    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
                    argv = self.sandbox.wrap(
                        argv,
                        cwd=Path(cwd),
                        scratch=scratch,
                        state_paths=state_paths(profile.state_dirs, env),
                        tmpdir=env.get("TMPDIR"),
                        search_path=env.get("PATH"),
                    )
                except (SandboxError, OSError) as exc:
                    message = f"sandbox: {exc}"
            if message is not None:
                log.note(message)
                log.flush()
                await self.store.finish(task.id, TaskStatus.FAILED, message=message)
                return
            # Our own pipes: their read ends are read in threads (turn_output.OutputPump).
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                proc = await anyio.open_process(
                    argv,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,  # its own process group, away from our terminal
                    stdin=subprocess.PIPE if profile.prompt == "stdin" else subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                )
            except OSError as exc:
                os.close(out_r)
                os.close(err_r)
                if isinstance(exc, FileNotFoundError):
                    # Either the binary or the working directory is missing.
                    if not Path(cwd).is_dir():
                        message = f"cwd {cwd!r} does not exist"
                    else:
                        message = f"worker binary not found: {argv[0]!r} (is it installed and on PATH?)"
                else:
                    message = f"could not start {argv[0]!r}: {exc.strerror or exc}"
                log.note(message)
                log.flush()
                await self.store.finish(task.id, TaskStatus.FAILED, message=message)
                return
            finally:
                os.close(out_w)
                os.close(err_w)
            turn.pid = proc.pid
            reader = reader_for(profile.events)
            # Plain text: only the latest lines are ever shown, so only they are split out.
            out = OutputPump(out_r, log, LineSplitter(None if reader.every_line else TAIL_LINES))
            err = OutputPump(err_r, log, LineSplitter(TAIL_LINES))
            try:
                await self.store.set_process(task.id, proc.pid, str(log.path))
                await self._supervise(turn, proc, reader, log, started, before, out, err)
            except BaseException:
                # Whatever went wrong here, the worker must not outlive its turn.
                with anyio.CancelScope(shield=True):
                    await self._terminate(task.id, proc.pid, started)
                raise
            finally:
                out.close()
                err.close()
        finally:
            log.close()
            if scratch is not None:
                # Scratch lives as long as its turn.
                await anyio.to_thread.run_sync(_remove_scratch, scratch)

    async def _terminate(self, task_id: str, pid: int, started: float) -> None:
        # bwrap dies at once on SIGTERM, taking its PID namespace with it: the
        # gentle signal goes to the worker inside, the bwrap processes are spared.
        spare = self.sandbox.wrapper_pids(pid)
        await terminate(
            task_id, pid, group_is_ours=True, not_before=started, spare_gentle=spare,
            spare=self._worker_pids(task_id),
        )  # fmt: skip

    async def _supervise(
        self,
        turn: RunningTurn,
        proc: Process,
        reader: EventReader,
        log: LogFile,
        started: float,
        before: str | None,
        out: OutputPump[list[WorkerEvent]],
        err: OutputPump[list[str]],
    ) -> None:
        """Watch the turn's process until it ends, then record how it ended."""
        clock_start = time.monotonic()
        meter = self._meter(turn, log)
        heard = TurnOutput(turn, reader, log, self.store, self._write_soon, meter)
        outcome = await self._until_end(turn, proc, heard, log, started, out, err, meter)
        # Whoever the end of the turn wakes may read the whole log at once.
        log.flush()
        tail = turn.tail.text(50)
        worker_s = time.monotonic() - clock_start
        ran = {"usage": usage_.add([usage_.empty() | {"worker_s": worker_s}, turn.usage])}
        if meter is not None:
            await meter.settle(turn.usage, worker_s)  # charged before the end is visible
        cwd = turn.task.run_dir or os.getcwd()
        after = await git_work.snapshot(cwd) if before else None
        ran["changes"] = await git_work.changes(cwd, before, after) if before and after else None
        status, fields = _turn_end(outcome, turn, heard, proc.returncode)
        await self.store.finish(turn.task.id, status, tail=tail, **fields, **ran)
        # The turn is over (and recorded, so waiters are already awake):
        # nothing it started may outlive it, escapees from its group included.
        if outcome == "exited":
            await self._terminate(turn.task.id, proc.pid, started)

    def _write_soon(self, write: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run a store write in the background while the runner serves (False: it does not)."""
        if self._tg is None:
            return False
        self._tg.start_soon(_quietly, write, *args)
        return True

    def _meter(self, turn: RunningTurn, log: LogFile) -> TurnMeter | None:
        """What charges the turn's usage to its budgets and stops it at its caps; None: neither applies."""
        task = turn.task
        if not (task.budgets or task.caps):
            return None
        return TurnMeter(
            self.budgets, task.id, [BudgetTarget.from_json(t) for t in task.budgets or []], task.caps,
            lambda: turn.usage, turn.stop_failed, log.note,
        )  # fmt: skip

    async def _until_end(
        self,
        turn: RunningTurn,
        proc: Process,
        heard: TurnOutput,
        log: LogFile,
        started: float,
        out: OutputPump[list[WorkerEvent]],
        err: OutputPump[list[str]],
        meter: TurnMeter | None,
    ) -> str:
        """Feed the prompt and pump the output until the process exits, is
        cancelled or times out (then it is stopped); the output drained.
        Returns ``exited``, ``cancelled`` or ``timed_out``."""
        task = turn.task
        timeout = (task.deadline - self.store.clock.now()) if task.deadline else None
        out_done, err_done = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as pumps:
            if proc.stdin is not None:
                pumps.start_soon(_feed_prompt, proc, task.prompt)
            pumps.start_soon(_pump, lambda: out.run(heard.parse_stdout, _merge_events, heard.on_stdout), out_done)
            pumps.start_soon(_pump, lambda: err.run(_parse_stderr, _merge_lines, heard.on_stderr), err_done)
            if meter is not None:
                pumps.start_soon(meter.run)

            outcome = await _exit_or_stop(proc, turn, timeout)
            if outcome in ("cancelled", "timed_out"):
                log.note(
                    (turn.failure or _cancel_message(turn.cancel_reason)) if outcome == "cancelled" else "timed out"
                )
                await self._terminate(task.id, proc.pid, started)
                with anyio.CancelScope(shield=True):
                    await proc.wait()
            with anyio.move_on_after(DRAIN_S):
                await out_done.wait()
                await err_done.wait()
            # A descendant still holding the pipes open does not hold the turn.
            out.stop()
            err.stop()
            pumps.cancel_scope.cancel()
        return outcome


class TurnOutput:
    """What a running turn's output says: its activity and tail, its worker
    session, usage, failures and notices, as the worker's events report them."""

    def __init__(
        self, turn: RunningTurn, reader: EventReader, log: LogFile, store: Store,
        write_soon: Callable[..., bool], meter: TurnMeter | None,
    ) -> None:  # fmt: skip
        self.turn = turn
        self.reader = reader
        self.log = log
        self.store = store
        # Runs a store write in the background while the turn goes on (False: not written through).
        self.write_soon = write_soon
        self.meter = meter
        self.failure: list[str] = []
        self.notices: list[str] = []
        self._flushed_at = 0.0

    def parse_stdout(self, lines: list[str]) -> list[WorkerEvent]:
        return [event for line in lines for event in self.reader.feed(line)]

    def on_stdout(self, events: list[WorkerEvent]) -> None:
        turn = self.turn
        for event in events:
            if event.kind == "session":
                self.write_soon(self.store.set_worker_session, turn.task.session_id, event.text)
            elif event.kind == "failure":
                self.failure.append(event.text)
                self.activity(f"error: {event.text}")
            elif event.kind == "notice":
                self.notices.append(event.text)
                self.activity(f"error: {event.text}")
            elif event.kind == "usage":
                turn.usage = event.usage
                if self.meter is not None:
                    self.meter.poke()
                if event.usage is not None:
                    # Readable (and countable) while the turn still runs.
                    self.write_soon(self.store.set_usage, turn.task.id, event.usage)
            elif event.kind == "activity":
                self.activity(event.text)

    def on_stderr(self, lines: list[str]) -> None:
        for line in lines:
            self.turn.tail.add(line)

    def activity(self, line: str) -> None:
        """The turn's latest activity, written through to the store at most every ACTIVITY_FLUSH_S."""
        turn = self.turn
        turn.activity = line
        turn.tail.add(line)
        now = time.monotonic()
        if now - self._flushed_at >= ACTIVITY_FLUSH_S and self.write_soon(
            self.store.set_activity, turn.task.id, line, turn.tail.text(50)
        ):
            self._flushed_at = now
            self.log.flush()  # the log resource shows the turn so far


def _turn_end(outcome: str, turn: RunningTurn, heard: TurnOutput, code: int | None) -> tuple[TaskStatus, dict]:
    """How a turn that ended this way is recorded: its status and what ``Store.finish`` is told."""
    final = heard.reader.final()
    if outcome == "cancelled" and turn.failure is not None:
        # Stopped by a budget: failed, with what it produced until then.
        return TaskStatus.FAILED, {"message": turn.failure, "final": final, "exit_code": code}
    if outcome == "cancelled" and turn.interrupted:
        # The server is stopping: the turn did not finish, nobody cancelled it.
        return TaskStatus.FAILED, {"message": turn.cancel_reason, "exit_code": code}
    if outcome == "cancelled":
        return TaskStatus.CANCELLED, {"message": _cancel_message(turn.cancel_reason), "exit_code": code}
    if outcome == "timed_out":
        return TaskStatus.FAILED, {"message": "timed_out", "exit_code": code}
    if code == 0 and not heard.failure:
        return TaskStatus.COMPLETED, {"final": final or "", "exit_code": 0}
    message = _failure_message(code, heard.failure or heard.notices[-1:])
    return TaskStatus.FAILED, {"message": message, "final": final, "exit_code": code}


async def _feed_prompt(proc: Process, prompt: str) -> None:
    assert proc.stdin is not None
    try:
        await proc.stdin.send(prompt.encode())
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the worker exited or closed stdin without reading it all
    finally:
        await proc.stdin.aclose()


def _parse_stderr(lines: list[str]) -> list[str]:
    return [line for line in lines if line.strip()][-TAIL_LINES:]


async def _pump(run: Callable[[], Awaitable[None]], done: anyio.Event) -> None:
    try:
        await run()
    finally:
        done.set()


def _remove_scratch(scratch: Path) -> None:
    try:
        scratch.rmdir()  # most turns leave it empty: one call
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


def _merge_events(older: list[WorkerEvent], newer: list[WorkerEvent]) -> list[WorkerEvent]:
    """Undelivered events, of which only the activity the tail can hold is kept."""
    merged = older + newer
    activities = sum(1 for event in merged if event.kind == "activity")
    if activities <= TAIL_LINES:
        return merged
    drop = activities - TAIL_LINES
    kept: list[WorkerEvent] = []
    for event in merged:
        if event.kind == "activity" and drop > 0:
            drop -= 1
            continue
        kept.append(event)
    return kept


def _merge_lines(older: list[str], newer: list[str]) -> list[str]:
    return (older + newer)[-TAIL_LINES:]


async def _quietly(write: Callable[..., Awaitable[object]], *args: object) -> None:
    """A write while a turn runs (activity, usage): losing one must not stop the runner."""
    try:
        await write(*args)
    except Exception as exc:
        logger.warning("could not record a turn's progress: %s", exc)


def _failure_cause(exc: BaseException) -> str:
    """What a turn that broke down says: the OS's or the database's own words when there are any."""
    cause = _os_error(exc)
    if cause is not None and cause.strerror:
        return f"failed: {cause.strerror}" + (f": {cause.filename}" if cause.filename else "")
    db_error = _found(exc, DB_ERRORS)
    if db_error is not None:
        return f"failed: the database could not be written: {db_error}"
    return "internal error: see the server log"


def _found(
    exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...], depth: int = 0
) -> BaseException | None:
    """The first ``kind`` in ``exc``, its task-group members, or its causes (a few levels deep)."""
    if isinstance(exc, kind):
        return exc
    if depth > 8:
        return None
    inner: list[BaseException] = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else []
    inner += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    for e in inner:
        found = _found(e, kind, depth + 1)
        if found is not None:
            return found
    return None


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (task groups wrap what their tasks raise)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


async def _exit_or_stop(proc: Process, turn: RunningTurn, timeout: float | None) -> str:
    """Wait for the worker to exit, a cancel, or the deadline; say which came first."""
    outcome = "exited"
    with anyio.move_on_after(timeout if timeout is not None else float("inf")) as deadline:
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await proc.wait()
                tg.cancel_scope.cancel()

            async def cancelled() -> None:
                nonlocal outcome
                await turn.cancel_requested.wait()
                outcome = "cancelled"
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(cancelled)
    if deadline.cancelled_caught and outcome == "exited":
        # Exiting right at the deadline still counts as exiting.
        return "exited" if proc.returncode is not None else "timed_out"
    return outcome


def _cancel_message(reason: str | None) -> str:
    return f"cancelled: {reason}" if reason else "cancelled"


def _failure_message(code: int | None, failure: list[str]) -> str:
    if code is not None and code < 0:
        base = f"killed by {signal.Signals(-code).name}"
    elif code:
        base = f"exit {code}"
    else:
        base = "failed"
    return f"{base}: {failure[-1]}" if failure else base


async def stop_orphan(store: Store, task: TaskRow, status: TaskStatus, message: str, *, kill: bool = True) -> bool:
    """End a turn whose server is gone: kill what it left running, then record it.

    ``kill``: the turn ran on this host. Its processes and log belong to
    another host otherwise, where they are left alone (that host's next
    daemon finds them). False when another process recorded the end first.
    """
    if kill:
        await terminate(task.id, task.pid, not_before=task.started_at)
        if task.log_path:
            append_note(Path(task.log_path), message)
    return await store.finish(task.id, status, message=message, only_from=[TaskStatus.WORKING])

