"""What the inbox works with, handed to it by whoever serves it.

The inbox makes none of these and imports no host: ``worker_server.app``
opens them (its ``App`` has each of them) and the server or ``taskwarden
inbox`` passes that in (``create_inbox``, ``mount_inbox``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from guard.gate import Guard
    from guard.storage.changes import ChangeFeed
    from guard.storage.database import Database
    from worker_server.notify.delivery import Deliverer
    from worker_server.service import TaskService
    from worker_server.store import Store


class InboxDeps(Protocol):
    @property
    def db(self) -> Database: ...  # people, sessions, sign-in links

    @property
    def feed(self) -> ChangeFeed: ...  # what the live updates wait on

    @property
    def store(self) -> Store: ...  # tasks and their threads

    @property
    def service(self) -> TaskService: ...  # the people's side of human tasks

    @property
    def guard(self) -> Guard: ...  # approvals and the audit trail

    @property
    def deliverer(self) -> Deliverer: ...  # decision links sent to people
