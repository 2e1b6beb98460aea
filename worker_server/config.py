"""Configuration: a TOML file, overridden by ``TASKWARDEN_<KEY>`` variables.

The file is found as ``--config FILE``, else ``$TASKWARDEN_CONFIG``, else
``./taskwarden.toml``, else ``<user config dir>/taskwarden/config.toml``. Every
key has a built-in default, so taskwarden runs with no file at all.
"""

from __future__ import annotations

import getpass
import os
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker_server.forwarder import is_server_url, server_db_anchor
from worker_server.profiles import BUILTIN_PROFILES, WorkerProfile, merge_profile


class ConfigError(Exception):
    """The configuration file or environment holds a value taskwarden cannot use."""


def user_config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "taskwarden"


def user_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "taskwarden"


class IdentityConfig(BaseModel):
    """An HTTP caller: its bearer token's SHA-256 (hex), never the token itself."""

    model_config = ConfigDict(extra="forbid")
    token_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class NotifyConfig(BaseModel):
    """``[notify]``: where notifications go besides each person's own channels, and how.

    ``webhook``/``email`` are team channels: every event goes there too. The
    SMTP server sends every e-mail (a person's and the team's).
    """

    model_config = ConfigDict(extra="forbid")
    webhook: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    webhook_secret: str | None = Field(default=None, min_length=16, max_length=200)
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s<>]+@[^@\s<>]+$")
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    # starttls (upgrade a plain connection; refused if the server cannot),
    # tls (implicit TLS, port 465), none (loopback relays only).
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_ca_file: Path | None = None  # trust this CA too (a private relay)
    smtp_username: str | None = None
    smtp_password: str | None = None
    email_from: str = Field(default="taskwarden@localhost", max_length=320)
    # A one-click decision link works this long (and never past its approval).
    link_ttl_s: float = Field(default=86_400, gt=0, le=30 * 86_400)
    # "Will expire soon": this long before an approval expires.
    expiring_warn_s: float = Field(default=300, gt=0, le=86_400)
    # A failing delivery is retried with back-off (retry_base_s · 4ⁿ) this many times, then `failed`.
    max_attempts: int = Field(default=6, ge=1, le=50)
    retry_base_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKWARDEN_", extra="forbid", env_nested_delimiter="__")

    # None: the first installed agent CLI (codex, claude), else shell (see worker_server.workers).
    default_worker: str | None = None
    allowed_roots: list[str] = Field(default_factory=lambda: ["~"])
    identity: str = Field(default_factory=getpass.getuser)
    # A SQLite file (the default, one host), or postgresql://… (several daemons share it).
    db: str | None = None
    # Per-host state for a server database: daemon socket, logs, scratch (default: the user's state dir).
    state_dir: Path | None = None
    policy: Path | None = None
    log_dir: Path | None = None
    # isolation=worktree: where session worktrees are made (default: beside the logs).
    worktrees_dir: Path | None = None
    max_result_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    human_timeout_s: int = Field(default=86_400, ge=1, le=30 * 86_400)
    # How often a server looks for turns left "working" by another server on
    # the same database that died (it always does at start).
    reconcile_s: float = Field(default=30.0, ge=0.1, le=3600)
    # A daemon's lease in the daemon registry (renewed every third of it). On a
    # server database a daemon whose lease lapses is taken for lost: the others
    # fail its running turns ("interrupted: host lost") and run its queued ones.
    lease_s: float = Field(default=15.0, ge=0.3, le=3600)
    # A daemon with no sessions and no turns running or queued exits after this long.
    idle_exit_s: float = Field(default=600.0, ge=0.1, le=30 * 86_400)
    inbox_url: str = "http://127.0.0.1:8765/inbox"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    workers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # taskwarden's own sandbox around every turn (see worker_server.sandbox):
    # "none" runs workers unsandboxed and must be chosen explicitly.
    sandbox_backend: Literal["bwrap", "none"] = "bwrap"
    # More paths workers must not see (the database and log directories always are hidden).
    sandbox_hide: list[str] = Field(default_factory=list)
    identities: dict[str, IdentityConfig] = Field(default_factory=dict)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    # OpenTelemetry traces and metrics (worker_server.telemetry); also on when
    # OTEL_EXPORTER_OTLP_ENDPOINT is set.
    otel: bool = False

    # Set by load_settings: where the values came from, for messages.
    config_file: Path | None = None
    # How the default worker was chosen (said at start-up and by `taskwarden workers`).
    _default_worker_note: str | None = PrivateAttr(default=None)
    # The TOML file this settings class reads (a subclass per file, see load_settings).
    toml_path: ClassVar[Path | None] = None

    @field_validator("allowed_roots")
    @classmethod
    def _roots_not_empty(cls, roots: list[str]) -> list[str]:
        if not roots:
            raise ValueError("must list at least one directory")
        return roots

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = cls.toml_path
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # -- derived values ----------------------------------------------------

    @property
    def db_is_server(self) -> bool:
        """True for a PostgreSQL database shared by several daemons."""
        return bool(self.db) and is_server_url(str(self.db))

    @property
    def db_target(self) -> str:
        """What ``open_database`` opens: the SQLite file's path or the PostgreSQL URL."""
        if self.db_is_server:
            return str(self.db)
        return str(Path(self.db or user_state_dir() / "taskwarden.db").expanduser())

    @property
    def db_path(self) -> Path:
        """The SQLite file; for a server database, this host's anchor beside which
        per-host state lives (see ``forwarder.server_db_anchor``)."""
        if self.db_is_server:
            return server_db_anchor(str(self.db), self.state_dir or user_state_dir())
        return Path(self.db_target)

    @property
    def db_display(self) -> str:
        """The database for logs and messages: a server database's URL never shows its password."""
        if self.db_is_server:
            from guard.storage.postgres import redacted

            return redacted(self.db_target)
        return str(self.db_path)

    @property
    def logs_path(self) -> Path:
        return (self.log_dir or self.db_path.parent / "logs").expanduser()

    @property
    def worktrees_path(self) -> Path:
        return (self.worktrees_dir or self.logs_path.parent / "worktrees").expanduser()

    @property
    def scratch_path(self) -> Path:
        """Per-turn scratch directories (the sandbox's /tmp)."""
        return self.db_path.parent / "scratch"

    def sandbox_hidden(self) -> list[Path]:
        """What no worker may see: the database's directory, the logs, the runtime
        directory (``$XDG_RUNTIME_DIR/taskwarden``, where a daemon's socket lives),
        and ``sandbox_hide``."""
        hidden = [self.db_path.parent, self.logs_path]
        if os.environ.get("XDG_RUNTIME_DIR"):
            hidden.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "taskwarden")
        return [*hidden, *(Path(p).expanduser() for p in self.sandbox_hide)]

    def sandbox_read_only(self) -> list[Path]:
        """Files that stay read-only inside the sandbox even when inside a writable directory."""
        return [p for p in (self.policy, self.config_file) if p is not None]

    @cached_property
    def roots(self) -> list[Path]:
        # Resolved once: spawn-task checks every cwd against them.
        return [Path(r).expanduser().resolve() for r in self.allowed_roots]

    def inside_roots(self, path: Path) -> bool:
        """Whether ``path`` lies inside one of ``allowed_roots``."""
        try:
            resolved = path.expanduser().resolve()
        except (OSError, RuntimeError):
            return False
        return any(resolved == root or root in resolved.parents for root in self.roots)

    @property
    def default_worker_note(self) -> str | None:
        return self._default_worker_note

    def profiles(self) -> dict[str, WorkerProfile]:
        """Built-in worker profiles with the config file's overrides and additions."""
        merged = dict(BUILTIN_PROFILES)
        for name, override in self.workers.items():
            if name == "human":
                where = f"{self.config_file}: " if self.config_file else ""
                raise ConfigError(f"{where}workers.human: 'human' is reserved for human workers")
            try:
                merged[name] = merge_profile(merged.get(name), override)
            except ValidationError as exc:
                raise ConfigError(_describe(exc, prefix=f"workers.{name}", source=self.config_file)) from None
        return merged


def find_config_file(explicit: str | Path | None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    env = os.environ.get("TASKWARDEN_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"TASKWARDEN_CONFIG names a file that does not exist: {path}")
        return path
    for candidate in (Path.cwd() / "taskwarden.toml", user_config_dir() / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the configuration; ``overrides`` (CLI flags) win over everything."""
    path = find_config_file(config)
    settings_cls = type("FileSettings", (Settings,), {"toml_path": path, "__annotations__": {"toml_path": ClassVar[Path | None]}})
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = settings_cls(**clean)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source=path)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"{path}: {exc}") from None
    settings.config_file = path
    # Check profile overrides and the default worker now, not at first spawn.
    profiles = settings.profiles()
    if settings.default_worker is None:
        from worker_server.workers import pick_default

        settings.default_worker, settings._default_worker_note = pick_default(profiles)
    elif settings.default_worker != "human" and settings.default_worker not in profiles:
        where = f"{path}: " if path else ""
        raise ConfigError(
            f"{where}default_worker: unknown worker {settings.default_worker!r}; "
            f"known: {', '.join(sorted(profiles))}, human"
        )
    return settings


def _describe(exc: ValidationError, prefix: str = "", source: Path | None = None) -> str:
    where = f"{source}: " if source else ""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        lines.append(f"{where}{key}: {err['msg']}")
    return "\n".join(lines)
