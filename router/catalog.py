"""The catalog: models.yaml validated at start-up and compiled into a name -> Route table.

Every accepted spelling of a name (bare `cborg-chat`, without `:latest`, the public name) is
precomputed, so resolving a request's model is one dict lookup on the hot path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.validation import ConfigError, format_validation, read_yaml_mapping

from .durations import parse_duration

Protocol = Literal["openai", "anthropic", "gemini", "bedrock"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TimeoutsConf(_Strict):
    connect: float = 10.0
    first_byte: float = 600.0
    read: float = 300.0
    total: float = 1800.0


class RetryConf(_Strict):
    attempts: int = Field(2, ge=0, le=10, description="retries after the first try")
    backoff: float = Field(0.25, ge=0, description="base of the jittered exponential backoff, s")
    max_backoff: float = Field(8.0, ge=0)


class ProviderConf(_Strict):
    protocol: Protocol
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    commercial: bool = True
    local: bool = False            # served by CBorg inference nodes (lbl/*)
    region: str | None = None      # bedrock
    region_env: str | None = None
    api_version: str | None = None  # anthropic-version
    # The upstream serves OpenAI's Responses API itself (OpenAI): /v1/responses requests to its models are
    # passed through as sent, not translated to chat.
    native_responses: bool = False
    # Embeddings: the upstream reads token arrays as OpenAI's tokens (cl100k) and takes them as
    # they are. Otherwise the gateway decodes them to text first (router/providers/token_arrays.py).
    takes_token_ids: bool = False
    headers: dict[str, str] = {}
    timeouts: TimeoutsConf = TimeoutsConf()
    retry: RetryConf = RetryConf()
    # The egress proxy to this provider: an http(s):// URL, or `direct` for none. Unset: HTTPS_PROXY /
    # HTTP_PROXY / ALL_PROXY / NO_PROXY as curl reads them, except local providers, which go direct.
    proxy: str | None = None

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is not None and v != "direct":
            from .targets import Proxy
            Proxy.parse(v)          # raises ValueError without the credentials
        return v


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(0.0, ge=0)
    cached_input: float | None = Field(None, ge=0)
    cache_write: float | None = Field(None, ge=0)
    output: float = Field(0.0, ge=0)


class ModelConf(_Strict):
    name: str
    provider: str
    model: str
    mode: Literal["chat", "embedding"] = "chat"
    description: str = ""
    max_input_tokens: int = Field(8192, gt=0)
    max_output_tokens: int = Field(4096, gt=0)
    supports_vision: bool = False
    supports_function_calling: bool = False
    supports_prompt_caching: bool = False
    supports_system_messages: bool = True
    supports_reasoning: bool = False
    supports_reasoning_effort: bool | None = None   # None: as supports_reasoning (o1-mini says false)
    # The provider's own structured outputs (JSON Schema response_format). Anthropic models without
    # them get response_format through a forced tool instead (router/providers/anthropic.py).
    supports_response_schema: bool = False
    price: Price = Price()
    aliases: list[str] = []
    params: dict[str, Any] = {}          # defaults applied when the caller leaves them out
    base_url: str | None = None          # an OpenAI-compatible server for this model alone
    api_key_env: str | None = None
    fallbacks: list[str] = []
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _chat_only(self) -> "ModelConf":
        if self.mode == "embedding" and self.supports_response_schema:
            raise ValueError(f"{self.name}: supports_response_schema is for chat models; this one is an "
                             "embedding model")
        return self


class AliasConf(_Strict):
    name: str
    target: str
    system_prompt: str | None = None     # a file under the config's directory, e.g. prompts/x.md
    params: dict[str, Any] = {}
    description: str = ""


class LimitSet(_Strict):
    """Limits for one scope. None: no limit. Budgets apply to commercial models only."""

    parallel: int | None = Field(None, ge=0)
    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    budget: float | None = Field(None, ge=0, description="US dollars per budget_period")
    budget_period: str | None = None

    @model_validator(mode="after")
    def _period(self) -> "LimitSet":
        if self.budget_period is not None:
            parse_duration(self.budget_period)  # raises ValueError naming the text
        return self

    @property
    def period_s(self) -> float | None:
        return parse_duration(self.budget_period)


class LimitsConf(_Strict):
    """Defaults for every key and user; keys override theirs (`cborg keys create --rpm ...`)."""

    key: LimitSet = LimitSet()
    user: LimitSet = LimitSet(budget=50.0, budget_period="30d")
    # Per-user limits on groups of models, by name or `prefix/*` (e.g. "lbl/*": {parallel: 5}).
    models: dict[str, LimitSet] = {}
    lease_s: float = Field(30.0, gt=0, description="parallel-slot lease in Redis; renewed while in flight")

    @field_validator("models")
    @classmethod
    def _no_group_budgets(cls, v: dict[str, LimitSet]) -> dict[str, LimitSet]:
        for pattern, ls in v.items():
            if ls.budget is not None or ls.budget_period is not None:
                raise ValueError(f"{pattern}: budgets are per key and per user (limits.key, limits.user), "
                                 "not per model group")
        return v


class ResponsesConf(_Strict):
    """The Responses API's stored responses (`store`, `previous_response_id`, GET /v1/responses/{id})."""

    retention: str = "30d"     # how long a stored response can be read and continued; then it is deleted

    @field_validator("retention")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)       # raises ValueError naming the text
        return v

    @property
    def retention_s(self) -> float:
        return parse_duration(self.retention)


class KeyManagerConf(_Strict):
    """The lab's rules for keys researchers make themselves in the Key Manager (/key/manage)."""

    default_expiry: str = Field("365d", description="a new key's lifetime unless the researcher picks a shorter one")
    max_expiry: str | None = Field("365d", description="the longest lifetime a researcher may pick; null: never expires")
    max_keys_per_user: int = Field(20, ge=1, le=10_000, description="keys a researcher may hold at once (not revoked, not expired)")
    models: list[str] = Field([], description="model names or patterns (lbl/*) self-service keys may use; empty: all")

    @model_validator(mode="after")
    def _expiries(self) -> "KeyManagerConf":
        default = parse_duration(self.default_expiry)
        top = parse_duration(self.max_expiry)
        if default is None or default <= 0:
            raise ValueError("default_expiry: must be a positive duration such as 365d")
        if top is not None and default > top:
            raise ValueError(f"default_expiry ({self.default_expiry}) is longer than max_expiry ({self.max_expiry})")
        return self

    @property
    def max_expiry_s(self) -> float | None:
        return parse_duration(self.max_expiry)


class CatalogConf(BaseModel):
    """The whole file. Sections other than these belong to other parts (the inference node)."""

    model_config = ConfigDict(extra="allow")

    providers: dict[str, ProviderConf]
    models: list[ModelConf]
    aliases: list[AliasConf] = []
    limits: LimitsConf = LimitsConf()
    responses: ResponsesConf = ResponsesConf()
    key_manager: KeyManagerConf = KeyManagerConf()

    @model_validator(mode="after")
    def _cross_check(self) -> "CatalogConf":
        for name, p in self.providers.items():
            if p.native_responses and p.protocol != "openai":
                raise ValueError(f"providers.{name}: native_responses needs protocol openai (it is {p.protocol!r})")
        names: set[str] = set()
        for i, m in enumerate(self.models):
            if m.provider not in self.providers:
                raise ValueError(f"models[{i}] ({m.name}): provider {m.provider!r} is not under providers: "
                                 f"{sorted(self.providers)}")
            if m.name in names:
                raise ValueError(f"models[{i}]: duplicate name {m.name!r}")
            names.add(m.name)
        for i, a in enumerate(self.aliases):
            if a.target not in names:
                raise ValueError(f"aliases[{i}] ({a.name}): target {a.target!r} is not a model name")
            if a.name in names:
                raise ValueError(f"aliases[{i}]: name {a.name!r} is already used")
            names.add(a.name)
        by_name = {m.name: m for m in self.models}
        by_name.update({a.name: by_name[a.target] for a in self.aliases})
        for i, m in enumerate(self.models):
            for f in m.fallbacks:
                if f not in names:
                    raise ValueError(f"models[{i}] ({m.name}): fallback {f!r} is not a model name")
                # Budgets are checked on the requested model: a free model falling back to a paid
                # one would spend without a budget check.
                if not self.providers[m.provider].commercial and self.providers[by_name[f].provider].commercial:
                    raise ValueError(f"models[{i}] ({m.name}): fallback {f!r} is a commercial model; a free "
                                     "model's fallbacks must be free (budgets apply to commercial models)")
        return self


@dataclass(slots=True)
class Route:
    """What a requested name resolves to."""

    name: str                      # the canonical public name (alias or model)
    model: ModelConf               # the model that serves it
    provider: ProviderConf
    provider_name: str
    system_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    is_alias: bool = False

    @property
    def commercial(self) -> bool:
        return self.provider.commercial


def _variants(name: str) -> list[str]:
    """Spellings accepted for a public name, most specific first."""
    out = [name]
    base = name[: -len(":latest")] if name.endswith(":latest") else name
    out.append(base)
    out.append(base + ":latest")
    if "/" in base:
        bare = base.split("/", 1)[1]
        out += [bare, bare + ":latest"]
    return out


class Catalog:
    def __init__(self, conf: CatalogConf, root: Path):
        self.conf = conf
        self.root = root
        self.providers = conf.providers
        self.models = {m.name: m for m in conf.models}
        self.routes: dict[str, Route] = {}      # canonical public name -> Route
        self._names: dict[str, Route] = {}      # every accepted spelling -> Route
        for m in conf.models:
            prompt = self._prompt(m.system_prompt, f"models ({m.name}).system_prompt")
            self.routes[m.name] = Route(m.name, m, self.providers[m.provider], m.provider,
                                        prompt, dict(m.params))
        for a in conf.aliases:
            target = self.models[a.target]
            prompt = self._prompt(a.system_prompt, f"aliases ({a.name}).system_prompt")
            self.routes[a.name] = Route(a.name, target, self.providers[target.provider], target.provider,
                                        prompt, {**target.params, **a.params}, is_alias=True)
        for m in conf.models:
            for extra in m.aliases:
                self.routes.setdefault(extra, self.routes[m.name])
        # Exact public names win; then the shorter spellings, first come first served.
        for pub, r in self.routes.items():
            self._names[pub] = r
        ambiguous: set[str] = set()
        for pub, r in self.routes.items():
            for v in _variants(pub)[1:]:
                if v in self.routes:
                    continue
                have = self._names.get(v)
                if have is not None and have.name != r.name:
                    ambiguous.add(v)
                self._names.setdefault(v, r)
        for v in ambiguous:
            self._names.pop(v, None)
        self._lower = {k.lower(): r for k, r in self._names.items()}
        try:
            self.self_service_models = self.key_models(conf.key_manager.models)
        except ValueError as e:
            raise ConfigError(f"key_manager.models: {e}") from None

    def _prompt(self, ref: str | None, where: str) -> str | None:
        if not ref:
            return None
        p = (self.root / ref) if not os.path.isabs(ref) else Path(ref)
        try:
            return p.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read prompt file {p}: {e.strerror}") from None

    def resolve(self, name: str) -> Route | None:
        r = self._names.get(name)
        if r is None and isinstance(name, str):
            r = self._lower.get(name.lower())
        return r

    def public_names(self) -> list[str]:
        return list(self.routes)

    def key_models(self, names: list[str]) -> list[str]:
        """A key's model list with each name in its canonical spelling (what the per-request check
        compares), patterns (`openai/*`, `*`) kept. An unknown name is an error: a typo would
        otherwise make a key that is refused everywhere."""
        out, unknown = [], []
        for n in names:
            if n in ("*", "all-proxy-models") or n.endswith("/*"):
                out.append(n)
            elif (r := self.resolve(n)) is not None:
                out.append(r.name)
            else:
                unknown.append(n)
        if unknown:
            raise ValueError(f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                             "`cborg models status` or GET /v1/models lists the names")
        return out


def load_catalog(path: str | os.PathLike) -> Catalog:
    path = Path(path)
    raw = read_yaml_mapping(path, ConfigError)
    try:
        conf = CatalogConf.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation(e, raw)}") from None
    try:
        return Catalog(conf, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def default_config_path() -> Path:
    """CBORG_CONFIG, else ./models.yaml, else the models.yaml of this checkout."""
    env = os.environ.get("CBORG_CONFIG")
    if env:
        return Path(env)
    here = Path("models.yaml")
    if here.exists():
        return here
    return Path(__file__).resolve().parent.parent / "models.yaml"
