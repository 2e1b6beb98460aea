"""The gate every tool call passes: one decision per call, in a fixed order.

absent → hidden → argument check → deny / conditions / default → approval →
budgets → rate limits → the handler → the audit record. Nothing here knows
about MCP (``guard.middleware.GuardMiddleware`` adapts it; the host builds
one around its ``Guard``) or about tasks.
"""

from __future__ import annotations

import dataclasses

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from guard.approvals import (
    Approval,
    ApprovalError,
    ApprovalEvents,
    Approvals,
    ApprovalStatus,
)
from guard.audit import AuditLog, AuditRecord, Decision, Outcome
from guard import detectors
from guard.budgets import BudgetLedger, BudgetTarget, targets_for
from guard.storage.changes import ChangeFeed
from guard.storage.clock import Clock, SystemClock
from guard.storage.database import Database
from guard.conditions import STATE_PREFIX
from guard.decision import CounterLookup, Verdict, decide
from guard.digests import Digester
from guard.limits import Exhausted, Limiter, Reservation, ScopeKeys
from guard.outcomes import Refusal
from guard.policy import ApprovalSettings, Policy
from guard.redaction import redact_off_loop
from guard.reload import PolicySource
from guard.schema import migrate
from guard.validation import ArgumentChecker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    tool: str
    args: Mapping[str, Any]
    identity: str
    session: str
    #: The request that made this call when it is not ``tools/call`` (e.g.
    #: ``tasks/cancel``, decided as ``cancel-task``); the audit names it.
    via: str | None = None
    #: What that request named, e.g. the resource URI of a ``resources/read``
    #: decided as ``get-task``; kept in the audit record's arguments.
    target: str | None = None


#: Maps a resource URI to the tool call that decides reading it, or None (not guarded).
ResourceCalls = Callable[[str], "tuple[str, dict[str, Any]] | None"]

class GuardTelemetry(Protocol):
    """Where the guard reports what it decided (worker_server.telemetry: OpenTelemetry)."""

    def decision(
        self, call: Call, decision: str, rule: str | None, reason: str | None, outcome: str | None, started: float
    ) -> None: ...

    def approval_decided(self, approval: Approval) -> None: ...


#: Whether a call (its arguments valid) would change nothing, e.g. cancelling
#: tasks that already finished: such a call needs no human's approval.
ChangesNothing = Callable[["Call"], Awaitable[bool]]


class Principal(Protocol):
    """Who makes a call: an identity, in a session (the host's caller satisfies it)."""

    identity: str
    session: str


class ApprovalAsker(Protocol):
    """Asks the person at the MCP client to approve a call (elicitation).

    ``rounds`` False: ``ask`` sends the question and waits for the answer.
    ``rounds`` True (2026-07-28): ``ask`` returns the answer carried by this
    request, or raises ``InputRequired`` with the result that asks the question.
    """

    rounds: bool

    async def ask(self, approval: Approval, call: Call) -> bool | None:
        """True approve, False refuse, None nobody answered."""
        ...


class InputRequired(Exception):
    """The client must be asked in a later round (2026-07-28 input_required):
    the caller returns ``result`` now and the same call comes back with the answer."""

    def __init__(self, result: Any) -> None:
        super().__init__("input required from the client")
        self.result = result


class UnknownTool(Exception):
    """The tool does not exist for this caller (absent, or hidden by policy)."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"Unknown tool: {tool}")
        self.tool = tool


@dataclass
class Admission:
    """The call may run; settle it with ``Guard.settle`` once it has."""

    call: Call
    decision: Decision
    rule: str | None
    reason: str | None
    reservation: Reservation | None
    approval_id: str | None
    started: float
    # The budget keys the turns this call starts are charged to (guard.budgets).
    budgets: tuple[BudgetTarget, ...] = ()


@dataclass(frozen=True)
class Finding:
    """What one step of ``Guard.admit`` holds against a call (its Evaluate half).

    ``admit`` handles every finding in one place: enforced, the call is
    refused and audited as ``decision`` (with no ``refusal``, the tool reads
    as absent: ``UnknownTool``); in shadow mode a finding with a ``shadow``
    decision is audited as that and the call goes on. A finding with no
    ``shadow`` decision (an absent tool, invalid arguments) is enforced in
    every mode.
    """

    decision: Decision
    rule: str | None
    reason: str | None
    refusal: Refusal | None = None
    shadow: Decision | None = None
    approval_id: str | None = None

    @classmethod
    def refusing(
        cls, refusal: Refusal, decision: Decision, *, shadow: Decision | None = None, approval_id: str | None = None
    ) -> Finding:
        return cls(decision, refusal.rule, refusal.reason, refusal, shadow, approval_id)


@dataclass(frozen=True)
class Hold(Finding):
    """A person must approve the call first: enforced, ``admit`` asks for the
    approval, which lets the call go on or ends in a refusal of its own."""


@dataclass
class _Admitting:
    """One call on its way through ``admit``'s steps, and what they have settled so far."""

    call: Call
    policy: Policy
    checker: ArgumentChecker
    asker: ApprovalAsker | None
    started: float
    verdict: Verdict | None = None
    #: The audit's reason when it differs from the verdict's.
    reason: str | None = None
    approval: Approval | None = None
    budgets: tuple[BudgetTarget, ...] = ()
    reservation: Reservation | None = None

    @property
    def shadow(self) -> bool:
        return self.policy.mode == "shadow"

    @property
    def approval_id(self) -> str | None:
        return self.approval.id if self.approval is not None else None


class Guard:
    def __init__(
        self,
        db: Database,
        feed: ChangeFeed,
        policies: PolicySource,
        digester: Digester,
        *,
        clock: Clock | None = None,
        enabled: bool = True,
        callers: Callable[[Any], Principal] | None = None,
        inbox_url: str | None = None,
        resource_calls: ResourceCalls | None = None,
        approval_events: ApprovalEvents | None = None,
        changes_nothing: ChangesNothing | None = None,
        telemetry: GuardTelemetry | None = None,
    ) -> None:
        self.db = db
        self.changes_nothing = changes_nothing
        self.telemetry = telemetry
        # Where a person approves held calls; named in approval_required results.
        self.inbox_url = inbox_url
        self.resource_calls = resource_calls
        self.feed = feed
        self.policies = policies
        self.clock = clock or SystemClock()
        self.enabled = enabled
        self.callers = callers
        self.limiter = Limiter(db, self.clock)
        self.budgets = BudgetLedger(db, self.clock)
        self.approvals = Approvals(db, self.clock, feed, digester, approval_events)
        self.audit = AuditLog(db, self.clock, digester=digester)
        self._checker: ArgumentChecker | None = None
        self._tool_source: Callable[[], Awaitable[list[Any]]] | None = None
        # Tools whose annotations say they change nothing (see settle()).
        self._read_only: frozenset[str] = frozenset()
        # Verdicts that cannot depend on the arguments, per policy, tool and identity.
        self._verdicts: dict[tuple[int, str, str], tuple[Policy, Verdict]] = {}
        # admit's steps, in order.
        self._steps: tuple[Callable[[_Admitting], Awaitable[Finding | None]], ...] = (
            self._absent, self._hidden, self._arguments, self._denied, self._needs_approval,
            self._budget_left, self._rate_limits, self._approval_spent,
        )  # fmt: skip

    @classmethod
    async def open(
        cls,
        db: Database,
        feed: ChangeFeed,
        *,
        policy_path: str | Path | None = None,
        enabled: bool = True,
        callers: Callable[[Any], Principal] | None = None,
        clock: Clock | None = None,
        inbox_url: str | None = None,
        resource_calls: ResourceCalls | None = None,
        approval_events: ApprovalEvents | None = None,
        changes_nothing: ChangesNothing | None = None,
        telemetry: GuardTelemetry | None = None,
    ) -> Guard:
        await migrate(db)
        return cls(
            db, feed, PolicySource(policy_path), await Digester.for_database(db), clock=clock, enabled=enabled, callers=callers, inbox_url=inbox_url,
            resource_calls=resource_calls, approval_events=approval_events, changes_nothing=changes_nothing,
            telemetry=telemetry,
        )  # fmt: skip

    @property
    def policy(self) -> Policy:
        return self.policies.policy

    def set_tools(self, server: Any) -> None:
        """Learn the server's tools (names and input schemas) on first use."""

        async def load() -> list[Any]:
            return list(await server.list_tools())

        self._tool_source = load
        self._checker = None

    async def tools(self) -> ArgumentChecker:
        if self._checker is None:
            tools = await self._tool_source() if self._tool_source else []
            self._checker = ArgumentChecker({t.name: t.input_schema for t in tools})
            self._read_only = frozenset(
                t.name for t in tools if t.annotations is not None and t.annotations.read_only_hint
            )
        return self._checker

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload the policy when its file changes; flush the audit log on the way out."""
        try:
            async with anyio.create_task_group() as tg:
                # Load the secret detector's plugins now, off the event loop,
                # rather than inside the first call that is audited.
                tg.start_soon(anyio.to_thread.run_sync, detectors.plugins)
                await self.policies.watch(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await self.audit.flush()

    def sees_all(self, identity: str) -> bool:
        """Whether the policy's ``share`` lets ``identity`` see every identity's sessions."""
        share = self.policy.share
        return "*" in share or identity in share

    def is_hidden(self, tool: str) -> bool:
        policy = self.policy
        return self.enabled and policy.mode == "enforce" and (tool in policy.hide or "*" in policy.hide)

    # -- one call ------------------------------------------------------------

    async def admit(self, call: Call, asker: ApprovalAsker | None = None) -> Admission | Refusal:
        """Decide ``call``. Raises ``UnknownTool`` for a hidden or absent tool, and
        ``InputRequired`` when the client must be asked for approval first.

        Each step evaluates one thing and returns what it holds against the
        call, or None; what a step found is handled here, once: enforced (the
        call is refused), or in shadow mode audited as what enforce mode would
        have done while the call goes on.
        """
        started = time.monotonic()
        if not self.enabled:
            return Admission(call, Decision.ALLOW, None, "guard disabled", None, None, started)
        admitting = _Admitting(call, self.policy, await self.tools(), asker, started)
        for step in self._steps:
            found = await step(admitting)
            if found is None:
                continue
            if admitting.shadow and found.shadow is not None:
                await self._record(call, found.shadow, found.rule, found.reason, started, None)
                continue
            if isinstance(found, Hold):
                # Enforce mode: ask for the approval; it lets the call go on, or ends it.
                asked = await self._approval(admitting)
                if isinstance(asked, Approval):
                    admitting.approval = asked
                    continue
                found = asked
            return await self._enforce(admitting, found)
        verdict = await self._verdict(admitting)
        return Admission(
            call, Decision.ALLOW, verdict.rule_id, admitting.reason or verdict.reason, admitting.reservation,
            admitting.approval_id, started, admitting.budgets,
        )  # fmt: skip

    async def _enforce(self, admitting: _Admitting, found: Finding) -> Refusal:
        """Refuse the call for what a step found (a hidden tool reads as absent), audited first."""
        call = admitting.call
        if admitting.reservation is not None:
            # A refused call gives back the room it reserved.
            await self.limiter.release(admitting.reservation)
        approval_id = found.approval_id or admitting.approval_id
        await self._record(call, found.decision, found.rule, found.reason, admitting.started, Outcome.REFUSED, approval_id)
        if found.refusal is None:
            raise UnknownTool(call.tool)
        return found.refusal

    # -- admit's steps, in order: each returns what it holds against the call, or None.

    async def _absent(self, a: _Admitting) -> Finding | None:
        """A tool the server does not have (in every mode)."""
        if a.call.tool in a.checker:
            return None
        return Finding(Decision.HIDDEN, "unknown", "no such tool")

    async def _hidden(self, a: _Admitting) -> Finding | None:
        """A hidden tool reads as absent whatever its arguments: its verdict
        is reached before any argument is checked or condition runs."""
        if a.call.tool not in a.policy.hide and "*" not in a.policy.hide:
            return None
        verdict = await self._verdict(a)
        return Finding(Decision.HIDDEN, verdict.rule_id, verdict.reason, shadow=Decision.SHADOW_HIDDEN)

    async def _arguments(self, a: _Admitting) -> Finding | None:
        """Bounds first: conditions, counters and cost lookups only ever see
        arguments that fit the tool's schema (a 200k-character title is
        refused here, in time linear in its size). In every mode."""
        problem = a.checker.check(a.call.tool, a.call.args)
        if problem is None:
            return None
        field, message = problem
        refusal = Refusal("invalid_arguments", a.call.tool, "schema", f"{field}: {message}", extra={"field": field})
        return Finding.refusing(refusal, Decision.INVALID_ARGUMENTS)

    async def _denied(self, a: _Admitting) -> Finding | None:
        """A deny rule, a failed condition or the default."""
        verdict = await self._verdict(a)
        if verdict.action != "deny" or verdict.hidden:
            return None
        refusal = Refusal("policy_denied", a.call.tool, verdict.rule_id, verdict.reason)
        return Finding.refusing(refusal, Decision.DENY, shadow=Decision.SHADOW_DENY)

    async def _needs_approval(self, a: _Admitting) -> Finding | None:
        """A person must approve the call first (``require_approval``) unless it changes nothing."""
        verdict = await self._verdict(a)
        if verdict.action != "require_approval":
            return None
        if self.changes_nothing is not None and await self.changes_nothing(a.call):
            # Nothing for a person to weigh: the call runs (and is audited) at once.
            a.reason = f"{verdict.reason} (not needed: the call changes nothing)"
            return None
        return Hold(
            Decision.APPROVAL_REQUIRED, verdict.rule_id, verdict.reason, shadow=Decision.SHADOW_APPROVAL_REQUIRED
        )

    async def _budget_left(self, a: _Admitting) -> Finding | None:
        """Every budget the call's rules charge has room."""
        verdict = await self._verdict(a)
        if not verdict.budgets:
            return None
        a.budgets = targets_for(verdict.budgets, a.call.session, a.call.identity, a.shadow)
        spent = await self.budgets.check(a.budgets)
        if spent is None:
            return None
        retry = None if spent.retry_after_s is None else round(spent.retry_after_s, 3)
        refusal = Refusal(
            "budget_exhausted", a.call.tool, spent.target.rule_id, spent.message, retry_after_s=retry,
            extra={"budget": spent.target.name, "used": {spent.metric: spent.used}},
        )  # fmt: skip
        return Finding.refusing(refusal, Decision.BUDGET_EXHAUSTED, shadow=Decision.SHADOW_BUDGET_EXHAUSTED)

    async def _rate_limits(self, a: _Admitting) -> Finding | None:
        """Room in every rate limit, reserved now (released if the call is refused later)."""
        verdict = await self._verdict(a)
        if not verdict.limits:
            return None
        held = await self.limiter.reserve(verdict.limits, ScopeKeys(session=a.call.session, identity=a.call.identity))
        if not isinstance(held, Exhausted):
            a.reservation = held
            return None
        refusal = Refusal(
            "rate_limited", a.call.tool, held.rule_id, held.reason, retry_after_s=round(held.retry_after_s, 3)
        )
        return Finding.refusing(refusal, Decision.RATE_LIMITED, shadow=Decision.SHADOW_RATE_LIMITED)

    async def _approval_spent(self, a: _Admitting) -> Finding | None:
        """The approval is spent only now that the call will run: a call
        refused by a rate limit keeps its approval for the retry."""
        if a.approval is None or await self.approvals.consume(a.approval.id):
            return None
        refusal = Refusal(
            "approval_required", a.call.tool, (await self._verdict(a)).rule_id,
            "the approval was used by another identical call; ask again",
            approval=a.approval.summary(self.inbox_url),
        )  # fmt: skip
        return Finding.refusing(refusal, Decision.APPROVAL_REQUIRED)

    async def _verdict(self, a: _Admitting) -> Verdict:
        """The policy's verdict, reached once per call; conditions read the
        arguments with the schema's defaults filled in."""
        if a.verdict is None:
            with_defaults = dataclasses.replace(a.call, args=a.checker.with_defaults(a.call.tool, a.call.args))
            a.verdict = await self._decide(a.policy, with_defaults)
        return a.verdict

    async def _decide(self, policy: Policy, call: Call) -> Verdict:
        """decide(), remembered when the tool's rules cannot depend on the arguments."""
        key = (id(policy), call.tool, call.identity)
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] is policy:
            return cached[1]
        rules = (*policy.tools.get(call.tool, ()), *policy.tools.get("*", ()))
        verdict = decide(policy, call.tool, call.args, call.identity, await self._counters(policy, call, rules))
        if not any(r.conditions or (r.rate_limit and r.rate_limit.cost_from) for r in rules):
            if len(self._verdicts) > 4096:  # identities are few; bound it anyway
                self._verdicts.clear()
            self._verdicts[key] = (policy, verdict)
        return verdict

    async def _counters(self, policy: Policy, call: Call, rules: tuple[Any, ...]) -> CounterLookup:
        """Current values of the counters this tool's conditions read (``state.<name>``)."""
        names = {
            cond.path[len(STATE_PREFIX) :]
            for rule in rules
            for cond in rule.conditions
            if cond.path.startswith(STATE_PREFIX)
        }
        wanted = [(n, policy.counters[n].window_s, policy.counters[n].scope) for n in names if n in policy.counters]
        values = await self.limiter.usage(wanted, ScopeKeys(session=call.session, identity=call.identity))

        def lookup(counter: str, window_s: float, scope: str) -> int:
            return values.get(counter, 0)

        return lookup

    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        """Record how an admitted call ended; a protocol error gives its room back."""
        if outcome == Outcome.PROTOCOL_ERROR and admission.reservation is not None:
            await self.limiter.release(admission.reservation)
        if not self.enabled:
            return
        # The audit guarantee: a refusal, and any call to a tool that may change
        # something, is committed before its result returns. An allowed call
        # to a read-only tool is queued and committed right after by the same
        # batched writer, off the critical path of the cheapest, most frequent
        # calls; a crash in those few milliseconds can lose its record.
        durable = not (outcome == Outcome.OK and admission.call.tool in self._read_only)
        await self._record(
            admission.call,
            admission.decision,
            admission.rule,
            admission.reason,
            admission.started,
            outcome,
            admission.approval_id,
            durable=durable,
        )

    async def record_request(self, call: Call, outcome: Outcome | str, started: float, *, reason: str | None = None,
                             read_only: bool = False) -> None:
        """Audit a request that is not a tool call (``call.via``, e.g. ``tasks/get``).

        Such requests carry no policy of their own (what they touch is decided
        when the task is made or, for ``tasks/cancel``, by ``admit``); they are
        recorded as allowed with their outcome, read-only ones batched.
        """
        if not self.enabled:
            return
        durable = not (read_only and outcome == Outcome.OK)
        await self._record(call, Decision.ALLOW, None, reason, started, outcome, durable=durable)

    # -- approvals -------------------------------------------------------------

    async def _approval(self, a: _Admitting) -> Approval | Finding:
        """The approved, unused approval that lets this call run (the caller
        consumes it), or what refuses the call."""
        call = a.call
        verdict = await self._verdict(a)
        settings = verdict.approval or ApprovalSettings()
        # elicit off: the policy wants a human in the inbox or CLI, not the client.
        asker = a.asker if settings.elicit else None
        digest = await self.approvals.digest(call.tool, dict(call.args), call.identity)

        usable = await self.approvals.find_usable(digest)
        if usable is not None:
            if self.telemetry is not None:
                self.telemetry.approval_decided(usable)
            return usable

        # A denial or expiry the caller has not been told about yet.
        told = await self._report_unseen(call, digest, verdict)
        if told is not None:
            return told

        approval = await self.approvals.open(
            digest, call.tool, await redact_off_loop(dict(call.args)), call.identity, call.session,
            verdict.rule_id, verdict.reason, settings.expires_s, settings,
        )
        if asker is not None and asker.rounds:
            try:
                # May raise InputRequired: the question goes out as this call's result.
                answer = await asker.ask(approval, call)
            except InputRequired:
                raise
            except Exception:
                # A client that fails to answer is no answer: wait for a human.
                logger.warning("asking the client about %s failed; waiting for a human", approval.id, exc_info=True)
                approval = await self._wait_for_decision(approval, call, settings, None)
            else:
                if answer is not None:
                    await self._decide_from_client(approval, call, answer)
                approval = await self.approvals.get(approval.id) or approval
        else:
            approval = await self._wait_for_decision(approval, call, settings, asker)
        status = approval.status_at(self.clock.now())
        if status == ApprovalStatus.APPROVED:
            if self.telemetry is not None:
                self.telemetry.approval_decided(approval)
            return approval
        if status in (ApprovalStatus.DENIED, ApprovalStatus.EXPIRED):
            told = await self._report_unseen(call, digest, verdict)
            if told is not None:
                return told
        refusal = Refusal(
            "approval_required", call.tool, verdict.rule_id, verdict.reason, approval=approval.summary(self.inbox_url)
        )
        return Finding.refusing(refusal, Decision.APPROVAL_REQUIRED, approval_id=approval.id)

    async def _report_unseen(self, call: Call, digest: str, verdict: Verdict) -> Finding | None:
        latest = await self.approvals.latest(digest)
        if latest is None or latest.used_at is not None:
            return None
        status = latest.status_at(self.clock.now())
        if status not in (ApprovalStatus.DENIED, ApprovalStatus.EXPIRED):
            return None
        # Tell it once; the next identical call opens a new approval.
        if not await self.approvals.acknowledge(latest.id):
            return None
        # It was decided: approving it is no longer possible, so say what is.
        summary = {**latest.summary(self.inbox_url), "status": status.value, "how_to_approve": _AFTER[status]}
        if status == ApprovalStatus.DENIED:
            if self.telemetry is not None:
                self.telemetry.approval_decided(latest)
            reason = latest.decision_note or "denied"
            refusal = Refusal("approval_denied", call.tool, verdict.rule_id, reason, approval=summary)
            return Finding.refusing(refusal, Decision.APPROVAL_DENIED, approval_id=latest.id)
        refusal = Refusal(
            "approval_expired", call.tool, verdict.rule_id, "nobody decided before it expired", approval=summary
        )
        return Finding.refusing(refusal, Decision.APPROVAL_EXPIRED, approval_id=latest.id)

    async def _wait_for_decision(
        self, approval: Approval, call: Call, settings: ApprovalSettings, asker: ApprovalAsker | None
    ) -> Approval:
        """Wait for the first answer, from a human (CLI, inbox) or from the client.

        Without a client to ask, wait ``wait_s``. A client that can ask its
        person is given until the approval expires: someone is looking at it.
        """
        if approval.status != ApprovalStatus.PENDING:
            return approval
        limit = settings.wait_s
        if asker is not None:
            limit = max(limit, approval.expires_at - self.clock.now())

        async def from_humans() -> None:
            while True:
                since = self.feed.generation
                current = await self.approvals.get(approval.id)
                if current is None or current.status_at(self.clock.now()) != ApprovalStatus.PENDING:
                    return
                await self.feed.wait(since, max(0.0, current.expires_at - self.clock.now()))

        started = anyio.current_time()
        with anyio.move_on_after(limit) as waiting:

            async def from_client() -> None:
                assert asker is not None
                try:
                    answer = await asker.ask(approval, call)
                except Exception:
                    logger.warning("asking the client about %s failed; waiting for a human", approval.id, exc_info=True)
                    answer = None
                if answer is None:
                    # Nobody is answering there after all: wait for a human, as
                    # long as for a client that cannot ask.
                    waiting.deadline = min(waiting.deadline, started + settings.wait_s)
                    await anyio.sleep_forever()
                await self._decide_from_client(approval, call, answer)

            async with anyio.create_task_group() as tg:

                async def first(fn: Callable[[], Awaitable[None]]) -> None:
                    await fn()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, from_humans)
                if asker is not None:
                    tg.start_soon(first, from_client)
        return await self.approvals.get(approval.id) or approval

    async def _decide_from_client(self, approval: Approval, call: Call, approve: bool) -> None:
        by = f"{call.identity} (in the MCP client)"
        note = None if approve else "declined in the MCP client"
        try:
            # The operator opted in to the client's answer (elicit): it counts as one decision.
            await self.approvals.decide(approval.id, approve, by, note, channel="client")
        except ApprovalError as exc:
            # Someone decided first (or it expired): the first answer stands.
            logger.info("client answer for %s not used: %s", approval.id, exc)

    # -- audit -------------------------------------------------------------------

    async def _record(
        self,
        call: Call,
        decision: Decision,
        rule: str | None,
        reason: str | None,
        started: float,
        outcome: Outcome | None,
        approval_id: str | None = None,
        *,
        durable: bool = True,
    ) -> None:
        if self.telemetry is not None:
            self.telemetry.decision(
                call, decision.value, rule, reason, outcome.value if isinstance(outcome, Outcome) else outcome, started
            )
        committed = self.audit.record(
            AuditRecord(
                identity=call.identity,
                session=call.session,
                tool=call.via or call.tool,
                args=dict(call.args) if call.target is None else {**call.args, "resource": call.target},
                decision=decision,
                rule=rule,
                reason=reason,
                approval_id=approval_id,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                outcome=outcome,
            ),
            urgent=durable,
        )
        if durable:
            await committed  # the record is committed before the result reaches the client
        else:
            committed.add_done_callback(_log_lost_record)


_AFTER = {
    ApprovalStatus.DENIED: (
        "A person denied this call; it can no longer be approved. Change the call or ask your person why; "
        "calling again with the same arguments asks for a new approval."
    ),
    ApprovalStatus.EXPIRED: (
        "Nobody decided in time; calling again with the same arguments opens a new approval for a person."
    ),
}


def _log_lost_record(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("an audit record could not be written: %s", future.exception())
