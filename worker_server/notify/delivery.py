"""The daemon's delivery loop: send what the outbox holds, retry with back-off, give up visibly.

It wakes on any change to the database (a new row is a change) and at the
next due time (a retry, an approval about to expire, an escalation); it
never polls in a tight loop. Sending is at least once: a daemon killed
between a send and its ``sent`` mark sends that row again after restart (its
lease runs out); the ``X-Taskwarden-Delivery`` id lets a receiver drop the
repeat. A row marked ``sent`` is never sent again.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from guard.approvals import Approval, Approvals, ApprovalStatus
from guard.storage.changes import ChangeFeed
from guard.storage.clock import Clock
from guard.storage.database import Tx
from worker_server.config import Settings
from worker_server.db_errors import DB_ERRORS
from worker_server.notify.channels import DeliveryError, build_email, send_email, send_webhook
from worker_server.notify.events import Notices
from worker_server.notify.links import LinkSigner
from worker_server.notify.outbox import Notification, Outbox

logger = logging.getLogger(__name__)

# Look again at least this often, even with nothing due (a clock change, a missed wake-up).
MAX_SLEEP_S = 300.0
# Retries back off exponentially up to this far apart.
MAX_BACKOFF_S = 3600.0


class Deliverer:
    def __init__(
        self,
        outbox: Outbox,
        approvals: Approvals,
        notices: Notices,
        signer: LinkSigner,
        settings: Settings,
        feed: ChangeFeed,
        clock: Clock,
    ) -> None:
        self.outbox = outbox
        self.approvals = approvals
        self.notices = notices
        self.signer = signer
        self.settings = settings
        self.feed = feed
        self.clock = clock
        self._timed_queued: set[str] = set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            since = self.feed.generation
            try:
                next_timed = await self.queue_timed()
                batch = await self.outbox.lease()
                for notification in batch:
                    await self.deliver(notification)
                if batch:
                    continue
                due = await self.outbox.next_due()
            except (*DB_ERRORS, OSError):
                logger.exception("notification delivery failed; trying again shortly")
                next_timed, due = None, self.clock.now() + 5
            now = self.clock.now()
            wake = min(t for t in (due, next_timed, now + MAX_SLEEP_S) if t is not None)
            await self.feed.wait(since, max(0.05, wake - now))

    async def queue_timed(self) -> float | None:
        """Queue due expiring-soon and escalation notices; when the next one falls due."""
        now = self.clock.now()
        pending: list[Approval] = [
            a for a in await self.approvals.list(ApprovalStatus.PENDING) if a.expires_at > now
        ]
        due, upcoming = self.notices.due_timed(pending)
        live = {a.id for a in pending}  # forget approvals that are no longer pending
        self._timed_queued = {key for key in self._timed_queued if key.split(":", 1)[1] in live}
        # Each is queued once (the outbox's unique key); skip the write for those this process queued.
        due = [(key, a) for key, a in due if key not in self._timed_queued]
        if due:
            await self.outbox.db.write(lambda c: self.notices.queue_timed(c, due))
            self._timed_queued.update(key for key, _ in due)
        return upcoming

    def decide_link(self, n: Notification) -> str | None:
        """A signed one-click link for an approver's own notification (never for a team channel)."""
        recipient = n.payload.get("recipient")
        approval_id = n.payload.get("approval_id")
        if not (n.payload.get("decide") and recipient and approval_id):
            return None
        expires = self.clock.now() + self.settings.notify.link_ttl_s
        return self.signer.url(self.settings.inbox_url, approval_id, recipient, expires)

    async def send(self, n: Notification, secret: str | None) -> None:
        """One attempt on the notification's channel; raises ``DeliveryError``."""
        config = self.settings.notify
        link = self.decide_link(n)
        if n.channel == "webhook":
            await send_webhook(n.target, secret, n.id, n.kind, n.payload, link, config.timeout_s)
        else:
            await send_email(config, build_email(config, n.target, n.id, n.payload, link))

    async def deliver(self, n: Notification) -> str | None:
        """Send one leased notification and record how it went; the error, if any."""
        try:
            await self.send(n, await self.secret_for(n))
        except DeliveryError as exc:
            attempts = n.attempts + 1
            config = self.settings.notify
            retry_at = None
            if attempts < config.max_attempts:
                retry_at = self.clock.now() + min(MAX_BACKOFF_S, config.retry_base_s * 4 ** (attempts - 1))
            await self.outbox.mark_failed_attempt(n.id, str(exc), retry_at)
            level = logging.INFO if retry_at is not None else logging.WARNING
            logger.log(level, "notification %s (%s to %s) attempt %d failed%s: %s", n.id, n.kind, n.recipient,
                       attempts, "" if retry_at is None else ", will retry", exc)  # fmt: skip
            return str(exc)
        await self.outbox.mark_sent(n.id)
        logger.info("notification %s (%s) sent to %s by %s", n.id, n.kind, n.recipient, n.channel)
        return None

    async def secret_for(self, n: Notification) -> str | None:
        if n.channel != "webhook":
            return None
        if n.payload.get("recipient") is None:
            return self.settings.notify.webhook_secret

        def read(c: Tx) -> str | None:
            row = c.execute("SELECT webhook_secret FROM inbox_humans WHERE name = ?", (n.recipient,)).fetchone()
            return row[0] if row else None

        return await self.outbox.db.read(read)
