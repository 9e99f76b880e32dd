"""Every authorization decision: API keys (generation, hashing, verification from an in-memory
cache), the master key, and which models a key may use.

No request reads the database for a key the gateway already knows: every key is loaded at
start-up, and a poller fetches rows changed since its last look every `refresh_s` seconds, so a
revocation on any replica (or by `cborg keys revoke`) takes effect everywhere within that time.
Unknown keys cost one database read, then sit in a short negative cache so that a client
hammering with a bad key cannot hammer the database.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING

from common.asgi import HTTPError
from common.tasks import stop_task
from common.bounded import BoundedDict

from .store.base import KeyRecord, Store, UserRecord

if TYPE_CHECKING:
    from .catalog import Route

log = logging.getLogger("cborg.auth")

KEY_PREFIX = "sk-"


def generate_key() -> str:
    """sk- followed by 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_hint(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}"


def new_key_id() -> str:
    return "key-" + secrets.token_hex(6)


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer`, or `x-api-key` / `api-key` (Anthropic and Azure SDKs)."""
    v = headers.get(b"authorization")
    if v is not None:
        if v[:7].lower() == b"bearer ":
            return v[7:].strip().decode("latin-1")
        return v.strip().decode("latin-1") or None
    v = headers.get(b"x-api-key") or headers.get(b"api-key")
    return v.strip().decode("latin-1") if v else None


def allowed(key: KeyRecord, route: "Route") -> bool:
    """A key limited to a model list may use those names, aliases of them, and `prefix/*`."""
    models = key.models
    if not models:
        return True
    for n in (route.name, route.model.name):
        if n in models:
            return True
        slash = n.find("/")
        if slash > 0 and n[: slash + 1] + "*" in models:
            return True
    return "*" in models or "all-proxy-models" in models


def master_matches(master_key: str | None, token: str | None) -> bool:
    """`token` is this gateway's master key (compared in constant time)."""
    return bool(master_key and token and hmac.compare_digest(master_key.encode(), token.encode()))


def is_master(master_key: str | None, headers: dict[bytes, bytes]) -> bool:
    """The request carries this gateway's master key."""
    return master_matches(master_key, bearer_token(headers))


def key_manager_role(email: str, domains: tuple[str, ...], admins: tuple[str, ...],
                     verified: object = True) -> str | None:
    """Who someone the lab's identity provider vouches for is in the Key Manager: "admin" (their
    e-mail is in CBORG_ADMIN_EMAILS), "user" (an e-mail in CBORG_OIDC_ALLOWED_DOMAINS or a
    subdomain of one; any e-mail when none is set), or None: not let in. An e-mail the provider
    does not say is verified (an email_verified claim that is anything but true) is nobody's."""
    email = email.strip().lower()
    at = email.rfind("@")
    # Some providers send the claim as a string, a number or null ("false", 0): only true lets in
    # (a provider that sends no claim at all: see the caller).
    if verified is not True or at <= 0:
        return None
    if email in admins:
        return "admin"
    domain = email[at + 1:]
    if not domains or any(domain == d or domain.endswith("." + d) for d in domains):
        return "user"
    return None


def require_master(master_key: str | None, headers: dict[bytes, bytes]) -> None:
    """403 when the admin API is off (no master key configured), 401 without the master key."""
    if not master_key:
        raise HTTPError(403, "The admin API is off: this gateway has no CBORG_MASTER_KEY.", code="admin_api_off")
    if not is_master(master_key, headers):
        raise HTTPError(401, "This endpoint needs the master key.", code="invalid_api_key")


class KeyCache:
    def __init__(self, store: Store, refresh_s: float = 2.0, negative_ttl_s: float = 2.0):
        self.store = store
        self.refresh_s = refresh_s
        self.negative_ttl_s = negative_ttl_s
        self.by_hash: dict[str, KeyRecord] = {}
        self.users: dict[str, UserRecord] = {}      # users with limits of their own (the policy reads them)
        self._negative: dict[str, float] = BoundedDict(100_000)
        self._since = 0.0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._since = time.time()
        for u in await self.store.users_changed_since(0.0):
            self.users[u.user_id] = u
        for k in await self.store.list_keys():
            self.by_hash[k.key_hash] = k
        self._task = asyncio.create_task(self._poll(), name="key-cache-refresh")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def refresh(self) -> None:
        # Overlap the window by a few seconds: replicas' clocks and commit order differ a little.
        start = time.time()
        keys = await self.store.keys_changed_since(self._since - 5.0)
        # Users after keys: a user's change marks their keys in the same commit, so keys seen
        # changed here come with their user's new limits (the policy caches checks per key version).
        for u in await self.store.users_changed_since(self._since - 5.0):
            self.users[u.user_id] = u
        for k in keys:
            self.put(k)
        self._since = start

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving from the cache
                log.warning("key cache refresh failed: %s", e)

    def put(self, k: KeyRecord) -> None:
        self.by_hash[k.key_hash] = k
        self._negative.pop(k.key_hash, None)

    async def verify(self, raw: str | None) -> KeyRecord:
        if not raw:
            raise HTTPError(401, "Missing API key. Pass it as 'Authorization: Bearer sk-...'.",
                            code="missing_api_key")
        h = hashlib.sha256(raw.encode()).hexdigest()
        rec = self.by_hash.get(h)
        if rec is None:
            now = time.monotonic()
            until = self._negative.get(h)
            if until is None or until < now:
                rec = await self.store.key_by_hash(h)
                if rec is not None:
                    self.put(rec)
                else:
                    self._negative[h] = now + self.negative_ttl_s
            if rec is None:
                raise HTTPError(401, "Invalid API key. Check the key, or ask for a new one.",
                                code="invalid_api_key")
        if rec.revoked_at is not None or rec.blocked or rec.expires_at is not None:
            problem = rec.problem(time.time())
            if problem:
                raise HTTPError(401, problem, code="invalid_api_key")
        return rec

    async def caller(self, master_key: str | None, headers: dict[bytes, bytes]) -> KeyRecord | None:
        """The calling key, or None for the master key."""
        if is_master(master_key, headers):
            return None
        return await self.verify(bearer_token(headers))
