"""Provider adapters by protocol, and endpoints resolved from models.yaml and the environment."""
from __future__ import annotations

import os
from importlib import import_module

from ..catalog import ModelConf, ProviderConf
from .. import proxies
from ..targets import Target
from .base import Adapter, Endpoint

_MODULES = {"openai": "openai_compat", "anthropic": "anthropic", "gemini": "gemini", "bedrock": "bedrock"}
_loaded: dict[str, Adapter] = {}


def adapter(protocol: str) -> Adapter:
    """The module that translates for `protocol` (each implements base.Adapter; tests check it)."""
    mod = _loaded.get(protocol)
    if mod is None:
        mod = _loaded[protocol] = import_module(f"{__name__}.{_MODULES[protocol]}")
    return mod


def make_endpoint(name: str, conf: ProviderConf, model: ModelConf | None = None,
                  env: dict[str, str] | None = None) -> Endpoint:
    """Resolve base URL and credentials. A model's own base_url/api_key_env win over its provider's."""
    env = os.environ if env is None else env
    base = (model.base_url if model and model.base_url else None) \
        or (env.get(conf.base_url_env) if conf.base_url_env else None) or conf.base_url
    key_var = (model.api_key_env if model and model.api_key_env else None) or conf.api_key_env
    api_key = env.get(key_var) if key_var else None
    region = (env.get(conf.region_env) if conf.region_env else None) or \
        (adapter("bedrock").sdk_region(env) if conf.protocol == "bedrock" else None) or conf.region
    ep = Endpoint(provider=name, conf=conf, target=None, api_key=api_key or None, region=region)
    if conf.protocol == "bedrock":
        # Credentials are resolved at first use (router/providers/bedrock.py: prepare), from these
        # variables of the gateway's environment or botocore's default chain.
        ep.extra["aws_env"] = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_SESSION_TOKEN", "AWS_PROFILE") if env.get(k)}
        if not base and region:
            base = f"https://bedrock-runtime.{region}.amazonaws.com"
    if not base:
        ep.missing = f"the provider '{name}' has no base URL: set {conf.base_url_env or 'base_url in models.yaml'}"
        return ep
    try:
        ep.target = Target.parse(base)
    except ValueError:
        ep.missing = f"the provider '{name}' has an invalid base URL in {conf.base_url_env or 'models.yaml'}"
        return ep
    try:
        ep.target = proxies.choose(ep.target, conf.proxy, conf.local, env)
    except ValueError as e:     # an environment proxy the gateway cannot use (socks): say so, don't go around it
        ep.missing = f"the provider '{name}' cannot use its proxy: {e}"
        return ep
    if conf.commercial and not api_key and key_var:
        ep.missing = f"the provider '{name}' has no credentials on this gateway: set {key_var}"
    return ep
