"""One validated schema per admin request, shared by the HTTP admin API and the CLI.

Field names are LiteLLM's (what admins' scripts send), with CBorg's older names accepted as
aliases. Every number is finite and in range, every string free of control characters (a NUL
byte would reach PostgreSQL), every duration positive and at most a century: a bad field is a
400 naming it (HTTP) or an error naming it (CLI), and nothing is stored.
"""
from __future__ import annotations

import math
import re
import time
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic.functional_validators import AfterValidator, BeforeValidator

from ..durations import parse_duration

MAX_DURATION_S = 100 * 365 * 86400          # a century: longer is a typo, and overflows time arithmetic
MAX_METADATA_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(v: str) -> str:
    if _CONTROL.search(v):
        raise ValueError("must not contain control characters")
    return v


def _not_bool(v: Any) -> Any:
    """Before pydantic's lax mode turns true into the number 1 (one second)."""
    if isinstance(v, bool) or (isinstance(v, str) and not v.strip()):
        raise ValueError("not a duration: use e.g. 30d, 12h or 1y")
    return v


def _duration(v: Any) -> str | None:
    """A lifetime or period as admins write it (30d, 12h, 1y) or seconds; returned as text."""
    try:
        secs = parse_duration(v)
    except ValueError:
        raise ValueError("not a duration: use e.g. 30d, 12h or 1y") from None
    if secs is None:
        return None
    if not math.isfinite(secs) or secs < 1:
        raise ValueError("must be a duration of at least 1s, such as 30d")
    if secs > MAX_DURATION_S:
        raise ValueError("must be at most 100 years")
    return f"{round(secs)}s" if isinstance(v, (int, float)) else str(v).strip()


def _period(v: Any) -> str | None:
    if isinstance(v, str) and v.strip().lower() == "never":
        raise ValueError("must be a positive duration such as 30d (null restores the default)")
    return _duration(v)


def _models(v: Any) -> Any:
    if isinstance(v, str):   # the CLI's comma-separated list
        return [x.strip() for x in v.split(",") if x.strip()]
    return v


Text = Annotated[str, Field(min_length=1, max_length=320), AfterValidator(_clean)]
_KEYLIKE = re.compile(r"(?i)(key-|sk-)|[0-9a-f]{64}$")


def _alias(v: str) -> str:
    """Keys are found by id, secret, hash or alias: an alias that looked like another key's id
    once took that key's place in admin lookups (block, delete, info)."""
    if _KEYLIKE.match(v):
        raise ValueError("must not look like a key id (key-...), a key (sk-...) or a key hash")
    return _clean(v)


Alias = Annotated[str, Field(max_length=256), AfterValidator(_alias)]
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_clean)]
Duration = Annotated[str | int | float | None, BeforeValidator(_not_bool), AfterValidator(_duration)]
Period = Annotated[str | int | float | None, BeforeValidator(_not_bool), AfterValidator(_period)]
Parallel = Annotated[int, Field(ge=0, le=1_000_000)]
Rpm = Annotated[int, Field(ge=0, le=1_000_000_000)]
Tpm = Annotated[int, Field(ge=0, le=1_000_000_000_000)]
Budget = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
Tokens = Annotated[int, Field(ge=0, le=1_000_000_000_000)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    def given(self) -> dict[str, Any]:
        """The fields the caller sent (null included: it clears a setting), by attribute name."""
        return {n: getattr(self, n) for n in self.model_fields_set}


class Limits(_Schema):
    """A key's or a user's own limits; null puts one back to models.yaml's default."""

    max_parallel_requests: Parallel | None = Field(
        None, validation_alias=AliasChoices("max_parallel_requests", "max_parallel", "parallel"),
        description="parallel requests at once")
    rpm_limit: Rpm | None = Field(None, validation_alias=AliasChoices("rpm_limit", "rpm"),
                                  description="requests per minute")
    tpm_limit: Tpm | None = Field(None, validation_alias=AliasChoices("tpm_limit", "tpm"),
                                  description="tokens per minute")
    max_budget: Budget | None = Field(None, validation_alias=AliasChoices("max_budget", "budget"),
                                      description="US dollars per budget period (commercial models)")
    budget_duration: Period = Field(None, validation_alias=AliasChoices("budget_duration", "budget_period"),
                                    description="budget period, e.g. 30d")

    STORE_NAMES: ClassVar[dict[str, str]] = {"max_parallel_requests": "max_parallel", "rpm_limit": "rpm", "tpm_limit": "tpm",
              "max_budget": "max_budget", "budget_duration": "budget_period"}

    def changes(self) -> dict[str, Any]:
        """The store's field names and values of what was sent."""
        return {self.STORE_NAMES.get(n, n): v for n, v in self.given().items()}


class KeyFields(Limits):
    """What an admin may set on a key (/key/generate, /key/update, `cborg keys create|update`)."""

    key_alias: Alias | None = Field(None, validation_alias=AliasChoices("key_alias", "alias"))
    models: Annotated[list[ModelName], BeforeValidator(_models), Field(max_length=1000)] | None = Field(
        None, description="model names or patterns (openai/*) the key may use; empty: all")
    duration: Duration = Field(None, validation_alias=AliasChoices("duration", "expires"),
                               description="lifetime from now, e.g. 30d; 'never' or null: no expiry")
    metadata: dict[str, Any] | None = None
    blocked: bool | None = None

    STORE_NAMES: ClassVar[dict[str, str]] = {**Limits.STORE_NAMES, "key_alias": "alias", "duration": "expires_at"}

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        try:
            raw = orjson.dumps(v)
        except (TypeError, orjson.JSONEncodeError):
            raise ValueError("must be a JSON object nested at most 250 levels") from None
        if len(raw) > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes of JSON")
        if b"\\u0000" in raw:
            raise ValueError("must not contain NUL characters")
        return v

    def changes(self) -> dict[str, Any]:
        out = super().changes()
        if "expires_at" in out:
            d = out["expires_at"]
            out["expires_at"] = None if d is None else time.time() + parse_duration(d)
        if out.get("models") is None and "models" in out:
            out["models"] = []
        if out.get("metadata") is None and "metadata" in out:
            out["metadata"] = {}
        if "blocked" in out and out["blocked"] is None:
            del out["blocked"]
        return out


class KeyGenerate(KeyFields):
    user_id: Text = Field(validation_alias=AliasChoices("user_id", "user"), description="the owner's e-mail")
    duration: Duration = Field("365d", validation_alias=AliasChoices("duration", "expires"),
                               description="lifetime, e.g. 30d; 'never' or null: no expiry (default 365d)")

    def changes(self) -> dict[str, Any]:
        out = super().changes()
        out.pop("user_id", None)
        if "expires_at" not in out:
            out["expires_at"] = time.time() + parse_duration(self.duration)
        return out


KeyRef = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_clean)]


class KeyUpdate(KeyFields):
    key: KeyRef = Field(description="the key: its secret, id, hash or alias")

    def changes(self) -> dict[str, Any]:
        out = super().changes()
        out.pop("key", None)
        return out


class KeyTarget(_Schema):
    key: KeyRef = Field(description="the key: its secret, id, hash or alias")


class KeyDelete(_Schema):
    keys: list[KeyRef] | None = Field(None, max_length=10_000)
    key: KeyRef | None = None

    def refs(self) -> list[str]:
        return list(self.keys or ([self.key] if self.key else []))


class UserUpdate(Limits):
    model_config = ConfigDict(extra="forbid")

    user_id: Text = Field(validation_alias=AliasChoices("user_id", "user"), description="the user's e-mail")

    def changes(self) -> dict[str, Any]:
        out = super().changes()
        out.pop("user_id", None)
        return out


class CostRequest(_Schema):
    """POST /cost/calculate: a model and either token counts, a request's messages, or a response."""

    model: ModelName | None = None
    messages: list[Any] | None = None
    prompt: str | list[Any] | None = None
    input: str | list[Any] | None = None
    max_tokens: Tokens | None = None
    prompt_tokens: Tokens | None = None
    completion_tokens: Tokens | None = None
    cached_tokens: Tokens | None = None
    cache_creation_input_tokens: Tokens | None = None
    completion_response: "CompletionUsage | None" = None


class Usage(_Schema):
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    prompt_tokens_details: dict[str, Any] | None = None
    cache_creation_input_tokens: Tokens | None = None

    @field_validator("prompt_tokens_details")
    @classmethod
    def _details(cls, v: dict | None) -> dict | None:
        if v is not None:
            c = v.get("cached_tokens")
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 10**12):
                raise ValueError("cached_tokens must be a whole number from 0 to 10^12")
        return v


class CompletionUsage(_Schema):
    model: ModelName | None = None
    usage: Usage | None = None


CostRequest.model_rebuild()


class ModelTarget(_Schema):
    model_config = ConfigDict(extra="forbid")

    name: ModelName = Field(description="a model (or alias) name, or a deployment name")
    node: ModelName | None = Field(None, description="only on this node")


class ModelSwap(_Schema):
    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(description="the model whose deployment is replaced")
    to: ModelName = Field(description="the deployment to load in its place")
    node: ModelName | None = Field(None, description="the node holding `to` (default: the one that has it)")
