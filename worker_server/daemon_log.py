"""daemon.log: the detached daemon's log, rotated by size.

A daemon started by ``taskwarden serve`` runs for days; its log must not grow
without end. The stdlib's RotatingFileHandler rotates it, and the process's
stderr (fd 2) follows the current file, so whatever bypasses logging (a
warning, a crash's traceback) lands there too and is rotated with it.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

#: daemon.log is rotated past this size; daemon.log.1 … .3 keep the previous ones.
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DaemonLog(RotatingFileHandler):
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS, stderr_fd: int = 2) -> None:
        self._stderr_fd = stderr_fd
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(logging.Formatter(FORMAT))
        self._follow()

    def doRollover(self) -> None:  # noqa: N802 - the stdlib's name
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        """Point stderr's fd at the current file."""
        if self.stream is not None:
            self.stream.flush()
            os.dup2(self.stream.fileno(), self._stderr_fd)


def log_to(path: Path) -> DaemonLog:
    """Send the root logger (and fd 2) to ``path``, rotated by size, instead of stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = DaemonLog(path)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return handler
