"""Gateway settings, from the environment (the names DESIGN.md lists)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.paths import cborg_home

from .catalog import default_config_path


def words(text: str | None) -> tuple[str, ...]:
    """A comma- or space-separated list (e-mails, domains), lower-cased."""
    return tuple(w.lower() for w in (text or "").replace(",", " ").split())


@dataclass
class Settings:
    config_path: Path
    database_url: str
    redis_url: str | None = None
    master_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_max_body_bytes: int = 64 * 1024 * 1024   # a non-streamed upstream answer past this is a 502
    upstream_max_connections: int = 1024              # open connections per upstream (and proxy)
    key_refresh_s: float = 2.0
    env: dict[str, str] | None = None   # where provider credentials and base URLs are read; None: os.environ
    accounting: bool = True             # limits, budgets and the ledger; off only to benchmark without them
    request_logs: bool = True           # one JSON log line per request
    ledger_interval_s: float = 0.5
    redis_prefix: str = "cborg:"
    profile: str | None = None          # models.yaml profile whose inference nodes serve lbl/* (default_profile)
    nodes: list[dict] | None = None     # overrides the profile's node list (cborg serve, tests)
    node_poll_s: float = 2.0            # how often each node's status is read
    metrics_token: str | None = None    # when set, GET /metrics wants it as a bearer token
    # The Key Manager's sign-in (router/control/key_manager): OpenID Connect with the lab's identity
    # provider; without an issuer, only admins sign in, with the master key.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None      # none: a public client (PKCE alone)
    oidc_allowed_domains: tuple[str, ...] = ()  # e-mail domains that may sign in (and their subdomains)
    admin_emails: tuple[str, ...] = ()          # who sees the admin pages
    session_secret: str | None = None           # signs the Key Manager's cookies (see key_manager/sessions.py)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        s = cls(
            config_path=Path(env["CBORG_CONFIG"]) if env.get("CBORG_CONFIG") else default_config_path(),
            database_url=env.get("CBORG_DATABASE_URL") or f"sqlite:///{cborg_home() / 'cborg.db'}",
            redis_url=env.get("CBORG_REDIS_URL") or None,
            master_key=env.get("CBORG_MASTER_KEY") or None,
            max_body_bytes=int(env.get("CBORG_MAX_BODY_BYTES") or 32 * 1024 * 1024),
            upstream_max_body_bytes=int(env.get("CBORG_UPSTREAM_MAX_BODY_BYTES") or 64 * 1024 * 1024),
            upstream_max_connections=int(env.get("CBORG_UPSTREAM_MAX_CONNECTIONS") or 1024),
            key_refresh_s=float(env.get("CBORG_KEY_REFRESH_S") or 2.0),
            env=None if env is os.environ else dict(env),
            accounting=(env.get("CBORG_ACCOUNTING") or "on").lower() not in ("off", "0", "false", "no"),
            request_logs=(env.get("CBORG_REQUEST_LOGS") or "on").lower() not in ("off", "0", "false", "no"),
            ledger_interval_s=float(env.get("CBORG_LEDGER_INTERVAL_S") or 0.5),
            redis_prefix=env.get("CBORG_REDIS_PREFIX") or "cborg:",
            profile=env.get("CBORG_PROFILE") or None,
            node_poll_s=float(env.get("CBORG_NODE_POLL_S") or 2.0),
            metrics_token=env.get("CBORG_METRICS_TOKEN") or None,
            oidc_issuer=(env.get("CBORG_OIDC_ISSUER") or "").rstrip("/") or None,
            oidc_client_id=env.get("CBORG_OIDC_CLIENT_ID") or None,
            oidc_client_secret=env.get("CBORG_OIDC_CLIENT_SECRET") or None,
            oidc_allowed_domains=words(env.get("CBORG_OIDC_ALLOWED_DOMAINS")),
            admin_emails=words(env.get("CBORG_ADMIN_EMAILS")),
            session_secret=env.get("CBORG_SESSION_SECRET") or None,
        )
        for k, v in overrides.items():
            setattr(s, k, v)
        return s
