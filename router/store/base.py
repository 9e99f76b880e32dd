"""Records the stores keep (API keys, users) and the interface every store implements."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import orjson


@dataclass(slots=True)
class KeyRecord:
    id: str
    key_hash: str                 # SHA-256 hex of the secret; the secret itself is never stored
    key_hint: str                 # "sk-...abcd", safe to show
    user_id: str
    alias: str | None = None
    models: list[str] = field(default_factory=list)   # empty: every model
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    blocked: bool = False
    revoked_at: float | None = None
    max_parallel: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_budget: float | None = None
    budget_period: str | None = None
    spend: float = 0.0
    budget_reset_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def problem(self, now: float) -> str | None:
        """Why this key may not be used now, or None."""
        if self.revoked_at is not None:
            return "This API key has been revoked. Ask for a new key."
        if self.blocked:
            return "This API key is blocked. Contact the service administrators."
        if self.expires_at is not None and now >= self.expires_at:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.expires_at))
            return f"This API key expired on {when}. Ask for a new key."
        return None

    def public(self) -> dict[str, Any]:
        """What an admin or the key's owner may see: everything but the hash."""
        d = asdict(self)
        d.pop("key_hash")
        return d


@dataclass(slots=True)
class UserRecord:
    """A user (an e-mail: keys name their owner). The limits set here override models.yaml's
    `limits.user` for this user alone; None = the default. `updated_at` is 0 until an admin sets one."""
    user_id: str
    max_budget: float | None = None
    budget_period: str | None = None
    spend: float = 0.0
    budget_reset_at: float | None = None
    created_at: float = field(default_factory=time.time)
    max_parallel: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    updated_at: float = 0.0


@dataclass(slots=True)
class ResponseRecord:
    """A Responses API answer kept for `previous_response_id` and GET/DELETE /v1/responses/{id}: readable only
    by the key that made it. `native`: OpenAI stores the response itself (only its owner is kept here);
    otherwise `data` is the JSON of {"response": the Response, "input": every input item it answered}, kept
    as text (made from the bytes the client was sent; one object, where the parsed form is dozens for the
    garbage collector to walk while it waits to be written) and parsed by `content` when read."""
    id: str
    key_id: str
    model: str
    native: bool
    data: bytes | str = b"{}"
    created_at: float = field(default_factory=time.time)

    def content(self) -> dict[str, Any]:
        return orjson.loads(self.data)

    def text(self) -> str:
        return self.data if type(self.data) is str else self.data.decode()


@dataclass(slots=True)
class UserSummary:
    """A line of the admin's user list: the user's record (None: only keys so far) and key counts."""
    user_id: str
    user: UserRecord | None
    keys: int
    active_keys: int      # not revoked


@dataclass(slots=True)
class DaySpend:
    """One line of the daily aggregate (table spend_daily): a key's calls to a model on a UTC day."""
    day: int              # days since 1970-01-01, UTC
    key_id: str
    model: str
    requests: int
    cost: float


def prefix_range(prefix: str) -> tuple[str, str]:
    """Bounds of the strings that start with `prefix`, in code-point (UTF-8 byte) order: an
    index range scan, where LIKE 'x%' would not use the index (SQLite) or not in every collation."""
    return prefix, prefix + "\U0010ffff"


KEY_FIELDS = tuple(f.name for f in fields(KeyRecord))
USER_FIELDS = tuple(f.name for f in fields(UserRecord))
USER_LIMIT_FIELDS = ("max_budget", "budget_period", "max_parallel", "rpm", "tpm")
_JSON_FIELDS = {"models", "metadata"}
_BOOL_FIELDS = {"blocked"}


def key_to_row(k: KeyRecord) -> dict[str, Any]:
    d = {n: getattr(k, n) for n in KEY_FIELDS}
    for n in _JSON_FIELDS:
        d[n] = orjson.dumps(d[n]).decode()
    return d


def key_from_row(row: dict[str, Any]) -> KeyRecord:
    d = dict(row)
    for n in _JSON_FIELDS:
        v = d.get(n)
        d[n] = orjson.loads(v) if isinstance(v, (str, bytes)) else (v or ([] if n == "models" else {}))
    for n in _BOOL_FIELDS:
        d[n] = bool(d.get(n))
    return KeyRecord(**{n: d[n] for n in KEY_FIELDS if n in d})


def user_update_values(changes: dict[str, Any]) -> dict[str, Any]:
    """The columns an update of a user's limits writes: the limits, and when (it marks the change)."""
    bad = set(changes) - set(USER_LIMIT_FIELDS)
    if bad:
        raise ValueError(f"cannot update user fields {sorted(bad)}")
    return {**changes, "updated_at": time.time()}


def user_from_row(row: dict[str, Any]) -> UserRecord:
    return UserRecord(**{n: row[n] for n in USER_FIELDS if n in row})


class Store(Protocol):
    """Keys and users; the ledger and spend live here too (see accounting)."""

    async def init(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def create_key(self, key: KeyRecord) -> None: ...
    async def key_by_hash(self, key_hash: str) -> KeyRecord | None: ...
    async def find_key(self, id_or_hash: str) -> KeyRecord | None: ...
    async def list_keys(self, user_id: str | None = None) -> list[KeyRecord]: ...
    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None: ...
    async def keys_changed_since(self, ts: float) -> list[KeyRecord]: ...
    async def get_user(self, user_id: str) -> UserRecord | None: ...
    async def update_user(self, user_id: str, changes: dict[str, Any]) -> UserRecord:
        """Set a user's limits (creating the user if need be); the user's keys are marked changed in
        the same transaction, so that every replica's key cache reloads them with the new limits."""
        ...
    async def users_changed_since(self, ts: float) -> list[UserRecord]:
        """Users whose limits an admin set at or after `ts`."""
        ...
    async def put_responses(self, recs: list[ResponseRecord]) -> None:
        """Write (or replace) stored responses, in one transaction (router/stored_responses.py batches them)."""
        ...
    async def get_response(self, response_id: str) -> ResponseRecord | None: ...
    async def delete_response(self, response_id: str) -> bool: ...
    async def purge_responses(self, before: float) -> int:
        """Delete responses created before `before` (the retention in models.yaml); how many went."""
        ...
    async def search_keys(self, text: str | None, before: tuple[float, str] | None, limit: int) -> list[KeyRecord]:
        """Keys newest first, `limit` of them after the cursor `before` (created_at, id); with
        `text`: the key whose id or secret it is, and keys whose owner or alias starts with it."""
        ...
    async def count_keys(self) -> int: ...
    async def list_users(self, prefix: str, after: str, limit: int) -> list[UserSummary]:
        """Users (with keys, or a record) whose id starts with `prefix`, in id order after `after`."""
        ...
    async def daily_spend(self, user_id: str, since_day: int) -> list[DaySpend]:
        """A user's daily aggregate from `since_day` on."""
        ...
    async def users_spend_since(self, user_ids: list[str], since_day: int) -> dict[str, float]:
        """Each user's cost from `since_day` on, from the daily aggregate."""
        ...
    async def spends(self, key_ids: list[str], user_ids: list[str]) -> dict[str, tuple[float, float | None]]:
        """(spend, budget_reset_at) as last written, by limiter scope name ("k:<key id>", "u:<user id>")."""
        ...
