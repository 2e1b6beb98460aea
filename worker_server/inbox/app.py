"""The web inbox: a Starlette app for people, served at ``/inbox``.

``taskwarden serve --http`` mounts it beside ``/mcp`` (``mount_inbox``);
``taskwarden inbox`` serves it alone against the same database
(``worker_server.server.serve_inbox``). Routes, relative to the mount::

    GET  /                       the inbox (?tab=needs_reply|open|in_progress|approvals|done)
    GET  /tasks/{id}             a task: brief, deadline, thread, actions
    POST /tasks/{id}/{action}    claim | release | ask | reply | handin
    GET  /approvals/{id}         a held call: tool, arguments, the guard's reason
    POST /approvals/{id}/approve
    POST /approvals/{id}/deny    (a reason is required)
    GET  /audit                  the audit trail (?tool=&decision=&identity=&since=)
    GET  /events                 server-sent events: "change" whenever the database changes
    GET  /decide/{token}         a signed one-click decision link: the confirmation page;
                                 POST to it (approve, or deny with a reason) decides, once
    GET  /signin/{token}         the one-time sign-in page; POST to it signs in
    POST /signout
    GET  /static/...             inbox.css, inbox.js

Everything but the sign-in pages, decision links (the signed link is the
credential: ``worker_server.notify.links``) and the static files needs a signed-in
person; without one, pages answer 401 with the sign-in page and no data.
Every POST but sign-in must carry the form's CSRF token (else 403). Pages
work without JavaScript (forms post, then redirect); ``inbox.js`` adds live
updates. The app needs no lifespan of its own: the parts it is given
(``InboxDeps``) were opened by whoever serves it, and it imports no host.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import jinja2
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from guard.approvals import ApprovalError, ApprovalNotFound, NotAnApprover, ReasonRequired
from worker_server.inbox import views
from worker_server.inbox.accounts import SESSION_TTL_S, Accounts, LinkState
from worker_server.inbox.rendering import one_line_json, pretty_json, render
from worker_server.inbox.security import (
    CSRF_FIELD,
    SecurityHeaders,
    add_security_headers,
    clear_session_cookie,
    cross_site,
    csrf_ok,
    csrf_token,
    session_id,
    set_session_cookie,
)
from worker_server.notify.links import DecisionLink, LinkProblem
from worker_server.notify.outbox import link_spent, spend_link
from worker_server.service import InvalidArgument
from worker_server.turn_origin import peer_turn, refusal
from worker_server.store import TaskNotFound, TaskRow

if TYPE_CHECKING:
    from worker_server.inbox.deps import InboxDeps

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MOUNT = "/inbox"
TASK_ACTIONS = ("claim", "release", "ask", "reply", "handin")
# A quiet stream still gets a comment this often, so proxies keep it open.
SSE_PING_S = 15
# The stream re-checks the session at least this often, even with no changes.
SSE_RECHECK_S = 30.0
# ``taskwarden inbox`` gives requests in flight this long to finish when stopped.
GRACEFUL_S = 10

Handler = Callable[["Inbox", Request], Awaitable[Response]]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # everything is escaped; only rendering.render() output is Markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["markdown"] = render
    env.filters["when"] = views.when
    env.filters["pretty_json"] = pretty_json
    env.filters["one_line_json"] = one_line_json
    return env


def signed_in(handler: Handler) -> Handler:
    """The route needs a signed-in person; a POST also needs its CSRF token."""

    @functools.wraps(handler)
    async def endpoint(self: Inbox, request: Request) -> Response:
        sid = session_id(request)
        human = await self.accounts.session_human(sid) if sid else None
        if human is None or sid is None:
            return self.signin_required(request)
        request.state.human = human
        request.state.session = sid
        if request.method == "POST":
            form = await request.form(max_files=0, max_fields=20)
            if not csrf_ok(sid, form.get(CSRF_FIELD)):
                return self.error(
                    request,
                    403,
                    "This form was refused",
                    "It did not carry this page's security token (CSRF). Go back, reload the page and try again.",
                )
            request.state.form = form
        return await handler(self, request)

    return endpoint


class Inbox:
    """The inbox's routes over the parts it is given (``InboxDeps``: an open ``App`` has them)."""

    def __init__(self, deps: InboxDeps) -> None:
        self.deps = deps
        self.accounts = Accounts(deps.db, deps.store.clock)
        self.templates = Jinja2Templates(env=environment())

    # -- plumbing --------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.inbox, methods=["GET"]),
            Route("/tasks/{task_id}", self.task, methods=["GET"]),
            Route("/tasks/{task_id}/{action}", self.task_action, methods=["POST"]),
            Route("/approvals/{approval_id}", self.approval, methods=["GET"]),
            Route("/approvals/{approval_id}/{decision}", self.decide, methods=["POST"]),
            Route("/audit", self.audit, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
            Route("/decide/{token}", self.decide_link_page, methods=["GET"]),
            Route("/decide/{token}", self.decide_by_link, methods=["POST"]),
            Route("/signin/{token}", self.signin_page, methods=["GET"]),
            Route("/signin/{token}", self.signin, methods=["POST"]),
            Route("/signout", self.signout, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    def asgi(self) -> ASGIApp:
        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Request refused")
            return self.error(request, exc.status_code, title, str(exc.detail), bare=True)

        # Outside Starlette's own error middleware, so even a 500 carries the headers.
        return SecurityHeaders(Starlette(routes=self.routes(), exception_handlers={HTTPException: http_error}))

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        base = request.scope.get("root_path", "")
        human = getattr(request.state, "human", None)
        sid = getattr(request.state, "session", None)
        context = {"base": base, "human": human, "csrf": csrf_token(sid) if sid else "", **context}
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    def error(self, request: Request, status: int, title: str, detail: str, *, bare: bool = False) -> Response:
        if bare:  # no signed-in context (unknown routes): nothing but the message
            request.state.human = None
            request.state.session = None
        return self.page(request, "error.html", status, title=title, detail=detail)

    def signin_required(self, request: Request) -> Response:
        request.state.human = None
        request.state.session = None
        if request.url.path.rstrip("/").endswith("/events"):
            return PlainTextResponse("Sign in to the inbox first.", status_code=401)
        # A SameSite=Strict cookie is not sent on a navigation from another
        # site (a link in chat or mail); a link from this page is same-site.
        return self.page(
            request, "signin_required.html", 401, came_from_elsewhere=cross_site(request),
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        )

    def back_to(self, request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)

    async def _task_row(self, task_id: str) -> TaskRow | None:
        try:
            row = await self.deps.store.get(task_id)
        except TaskNotFound:
            return None
        return row if row.kind == "human" else None

    # -- pages -----------------------------------------------------------------

    @signed_in
    async def inbox(self, request: Request) -> Response:
        role = await self.accounts.role_of(request.state.human) or "worker"
        page = await views.inbox_page(self.deps, request.state.human, request.query_params.get("tab", ""), role)
        return self.page(request, "inbox.html", page=page, tabs=views.TABS)

    @signed_in
    async def task(self, request: Request) -> Response:
        return await self._task_response(request)

    async def _task_response(
        self, request: Request, status: int = 200, error: str | None = None, drafts: dict[str, str] | None = None
    ) -> Response:
        row = await self._task_row(request.path_params["task_id"])
        if row is None:
            return self.error(request, 404, "No such task", "There is no task for people with this id.")
        data = await views.task_page(self.deps, request.state.human, row)
        return self.page(request, "task.html", status, page=data, error=error, drafts=drafts or {})

    @signed_in
    async def task_action(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        action = request.path_params["action"]
        if action not in TASK_ACTIONS:
            return self.error(request, 404, "Not found", f"There is no task action {action!r}.")
        if await self._task_row(task_id) is None:
            return self.error(request, 404, "No such task", "There is no task for people with this id.")
        form: FormData = request.state.form
        text = str(form.get("text") or "")
        me = request.state.human
        humans = self.deps.service.humans
        assert humans is not None
        try:
            if action == "claim":
                await humans.claim(me, task_id)
            elif action == "release":
                await humans.release(me, task_id)
            elif action == "ask":
                await humans.ask(me, task_id, text)
            elif action == "reply":
                await humans.reply(me, task_id, text)
            else:
                await humans.handin(me, task_id, text)
        except InvalidArgument as exc:
            if exc.field == "task_id":  # the task is not in a state for this (any more)
                status, error = 409, _sentence(exc.message)
            else:  # the text: empty or too long
                status, error = 400, f"Your {exc.field} {exc.message}."
            return await self._task_response(request, status, error=error, drafts={action: text})
        return self.back_to(request, f"/tasks/{task_id}")

    @signed_in
    async def approval(self, request: Request) -> Response:
        return await self._approval_response(request)

    async def _approval_response(
        self, request: Request, status: int = 200, error: str | None = None, drafts: dict[str, str] | None = None
    ) -> Response:
        approval = await self.deps.guard.approvals.get(request.path_params["approval_id"])
        role = await self.accounts.role_of(request.state.human) or "worker"
        # Someone who may not decide it does not see it either: it does not exist for them.
        if approval is None or not approval.may_decide(request.state.human, role):
            return self.error(request, 404, "No such approval", "There is no approval with this id.")
        now = self.deps.store.clock.now()
        return self.page(
            request,
            "approval.html",
            status,
            approval=approval,
            status_now=approval.status_at(now).value,
            decisions=await self.deps.guard.approvals.decisions(approval.id),
            error=error,
            drafts=drafts or {},
        )

    @signed_in
    async def decide(self, request: Request) -> Response:
        approval_id = request.path_params["approval_id"]
        decision = request.path_params["decision"]
        if decision not in ("approve", "deny"):
            return self.error(request, 404, "Not found", f"There is no approval action {decision!r}.")
        form: FormData = request.state.form
        note = str(form.get("reason") or form.get("comment") or "")
        server = request.scope.get("server")
        turn = await anyio.to_thread.run_sync(
            lambda: peer_turn(tuple(request.client) if request.client else None, tuple(server) if server else None)
        )
        if turn is not None:
            logger.warning("approval %s: a decision from inside the turn of %s was refused", approval_id, turn)
            return self.error(request, 403, "Refused", _sentence(refusal(turn)))
        role = await self.accounts.role_of(request.state.human) or "worker"
        try:
            await self.deps.guard.approvals.decide(
                approval_id, decision == "approve", by=request.state.human, note=note, channel="inbox", role=role
            )
        except NotAnApprover:
            return self.error(request, 404, "No such approval", "There is no approval with this id.")
        except ReasonRequired:
            return await self._approval_response(
                request, 400, error="A reason is required to deny: the agent is shown it.", drafts={"reason": note}
            )
        except ApprovalNotFound:
            return self.error(request, 404, "No such approval", "There is no approval with this id.")
        except ApprovalError as exc:
            return await self._approval_response(request, 409, error=_sentence(str(exc)))
        return self.back_to(request, f"/approvals/{approval_id}")

    @signed_in
    async def audit(self, request: Request) -> Response:
        page = await views.audit_page(self.deps, dict(request.query_params))
        return self.page(request, "audit.html", status=400 if page.error else 200, page=page)

    # -- live updates ------------------------------------------------------------

    @signed_in
    async def events(self, request: Request) -> Response:
        """``change`` whenever the database changes (here or in another process);
        ``signed-out`` (then the end) when the session is gone."""
        feed = self.deps.feed
        sid: str = request.state.session
        shutdown = anyio.Event()  # set by sse_starlette when the server stops

        async def next_change(since: int) -> bool:
            changed = False
            async with anyio.create_task_group() as tg:

                async def on_shutdown() -> None:
                    await shutdown.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_shutdown)
                changed = await feed.wait(since, SSE_RECHECK_S)
                tg.cancel_scope.cancel()
            return changed

        async def stream() -> AsyncIterator[dict[str, str]]:
            since = feed.generation
            yield {"event": "ready", "data": "listening"}
            count = 0
            while True:
                changed = await next_change(since)
                if shutdown.is_set():
                    return  # ends the response properly; the browser reconnects later
                since = feed.generation
                if await self.accounts.session_human(sid) is None:
                    yield {"event": "signed-out", "data": "signed out"}
                    return
                if changed:
                    count += 1
                    yield {"event": "change", "data": str(count)}
                    # Coalesce a burst of writes into one refresh.
                    await anyio.sleep(0.05)

        return EventSourceResponse(
            stream(),
            ping=SSE_PING_S,
            headers={"Cache-Control": "no-store"},
            shutdown_event=shutdown,
            shutdown_grace_period=1.0,
        )

    # -- one-click decisions (signed links from notifications) ---------------------

    async def _link(self, request: Request) -> tuple[DecisionLink | None, Response | None]:
        """The link in the URL, or the page saying why it decides nothing."""
        request.state.human = None
        request.state.session = None
        now = self.deps.store.clock.now()
        read = self.deps.deliverer.signer.read(request.path_params["token"], now)
        if read is LinkProblem.MALFORMED:
            return None, self._link_problem(request, 400, "This link is not valid",
                                            "It is not a decision link taskwarden made, or it was changed.")
        if read is LinkProblem.EXPIRED:
            return None, self._link_problem(request, 410, "This link has expired",
                                            "Decision links work for a limited time.")
        assert isinstance(read, DecisionLink)
        if await self.deps.db.read(lambda c: link_spent(c, read.nonce)):
            return None, self._link_problem(request, 410, "This link was already used", "Each link decides once.")
        return read, None

    def _link_problem(self, request: Request, status: int, title: str, detail: str) -> Response:
        return self.page(request, "decide.html", status, problem=detail, problem_title=title, approval=None)

    async def _link_page(
        self, request: Request, link: DecisionLink, status: int = 200, error: str | None = None, done: str | None = None
    ) -> Response:
        approval = await self.deps.guard.approvals.get(link.approval_id)
        if approval is None:
            return self._link_problem(request, 404, "No such approval", "There is no approval with this id.")
        role = await self.accounts.role_of(link.approver)
        if role is None or not approval.may_decide(link.approver, role):
            return self._link_problem(request, 403, "You may not decide this",
                                      f"{link.approver} is not (or no longer) one of its approvers.")
        return self.page(request, "decide.html", status, approval=approval, approver=link.approver,
                         status_now=approval.status_at(self.deps.store.clock.now()).value, error=error, done=done,
                         problem=None)  # fmt: skip

    async def decide_link_page(self, request: Request) -> Response:
        """The confirmation page. A GET decides nothing (link previewers and mail scanners fetch links)."""
        link, problem = await self._link(request)
        if problem is not None:
            return problem
        assert link is not None
        return await self._link_page(request, link)

    async def decide_by_link(self, request: Request) -> Response:
        link, problem = await self._link(request)
        if problem is not None:
            return problem
        assert link is not None
        if cross_site(request):
            return self.error(request, 403, "Refused", "Decide from the page the link opens.")
        server = request.scope.get("server")
        turn = await anyio.to_thread.run_sync(
            lambda: peer_turn(tuple(request.client) if request.client else None, tuple(server) if server else None)
        )
        if turn is not None:
            logger.warning("approval %s: a link decision from inside the turn of %s was refused", link.approval_id, turn)
            return self.error(request, 403, "Refused", _sentence(refusal(turn)))
        form = await request.form(max_files=0, max_fields=10)
        decision = str(form.get("decision") or "")
        if decision not in ("approve", "deny"):
            return await self._link_page(request, link, 400, error="Choose Approve or Deny.")
        note = str(form.get("reason") or form.get("comment") or "")[:2000]
        role = await self.accounts.role_of(link.approver)
        now = self.deps.store.clock.now()

        def spend(c: Any) -> None:
            if not spend_link(c, link.nonce, link.approval_id, now):
                raise LinkAlreadyUsed()

        try:
            approval = await self.deps.guard.approvals.decide(
                link.approval_id, decision == "approve", by=link.approver, note=note, channel="link", role=role,
                check=spend,
            )
        except LinkAlreadyUsed:
            return self._link_problem(request, 410, "This link was already used", "Each link decides once.")
        except ReasonRequired:
            return await self._link_page(request, link, 400, error="A reason is required to deny: the agent is shown it.")
        except NotAnApprover:
            return self._link_problem(request, 403, "You may not decide this",
                                      f"{link.approver} is not (or no longer) one of its approvers.")
        except ApprovalError as exc:
            return await self._link_page(request, link, 409, error=_sentence(str(exc)))
        if approval.status.value == "pending":
            done = f"Your approval is recorded ({approval.approvals_so_far} of {approval.quorum}); the call stays held until enough approvers agree."
        elif approval.status.value == "approved":
            done = "Approved. The agent's next identical call runs."
        else:
            done = "Denied. The agent is told your reason."
        return await self._link_page(request, link, done=done)

    # -- signing in --------------------------------------------------------------

    async def signin_page(self, request: Request) -> Response:
        """Show whose link this is; signing in is a POST (link previewers only GET)."""
        state, human = await self.accounts.link_state(request.path_params["token"])
        request.state.human = None
        request.state.session = None
        status = 200 if state == LinkState.VALID else 410 if state in (LinkState.USED, LinkState.EXPIRED) else 404
        return self.page(request, "signin.html", status, state=state.value, name=human)

    async def signin(self, request: Request) -> Response:
        request.state.human = None
        request.state.session = None
        if cross_site(request):
            return self.error(request, 403, "Sign-in refused", "Open the sign-in link itself to sign in.")
        result = await self.accounts.sign_in(request.path_params["token"])
        if result is None:
            state, human = await self.accounts.link_state(request.path_params["token"])
            return self.page(request, "signin.html", 410 if human else 404, state=state.value, name=human)
        response = self.back_to(request, "/")
        set_session_cookie(response, request, result.session_id, SESSION_TTL_S)
        return response

    @signed_in
    async def signout(self, request: Request) -> Response:
        await self.accounts.sign_out(request.state.session)
        response = self.back_to(request, "/")
        clear_session_cookie(response, request)
        return response


class LinkAlreadyUsed(Exception):
    """A decision link was spent by another request first (its decision is rolled back)."""


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def create_inbox(deps: InboxDeps) -> ASGIApp:
    """The inbox as an ASGI app (mount it at ``/inbox``)."""
    return Inbox(deps).asgi()


async def _redirect_to_inbox(request: Request) -> Response:
    return RedirectResponse(request.scope.get("root_path", "") + MOUNT + "/", status_code=307)


class _WithSecurityHeaders:
    """Security headers on a response of the host app (the /inbox → /inbox/ redirect)."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        response = await self.endpoint(Request(scope, receive))

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(message)
            await send(message)

        await response(scope, receive, send_with_headers)


def mount_inbox(starlette_app: Starlette, deps: InboxDeps) -> None:
    """Serve the inbox at ``/inbox`` inside ``starlette_app`` (the MCP SDK's app).

    The SDK's app keeps its lifespan (the MCP session manager); the inbox has
    none, so mounting it is all there is to do.
    """
    starlette_app.router.routes.append(Route(MOUNT, _WithSecurityHeaders(_redirect_to_inbox)))
    starlette_app.router.routes.append(Mount(MOUNT, app=create_inbox(deps), name="inbox"))


def inbox_root(deps: InboxDeps) -> Starlette:
    """The inbox alone (``taskwarden inbox``): at ``/inbox``, with ``/`` sent there."""
    return Starlette(
        routes=[
            Route("/", _WithSecurityHeaders(_redirect_to_inbox)),
            Route(MOUNT, _WithSecurityHeaders(_redirect_to_inbox)),
            Mount(MOUNT, app=create_inbox(deps), name="inbox"),
        ]
    )
