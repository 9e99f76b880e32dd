"""The `cborg` command: run the gateway or a node, manage keys and models."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def _die(msg: str, code: int = 2) -> None:
    print(f"cborg: {msg}", file=sys.stderr)
    sys.exit(code)


# -- router ---------------------------------------------------------------------------------
def run_router(host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    import uvicorn

    from router.catalog import ConfigError
    from router.config import Settings

    settings = Settings.from_env()
    try:
        from router.catalog import load_catalog
        load_catalog(settings.config_path)  # fail fast, with the bad field named
    except ConfigError as e:
        _die(str(e))
    if workers > 1 and settings.accounting and not settings.redis_url:
        # Each worker is a process with its own in-process limiter: 5 parallel requests would be 5
        # per worker and a budget could be spent once per worker.
        _die(f"--workers {workers} needs CBORG_REDIS_URL: limits and budgets are shared between worker "
             "processes only through Redis. Set CBORG_REDIS_URL, or run one worker.")
    from common.logs import setup_logging
    from common.server import server_options
    setup_logging(log_level)
    kw = server_options(host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False)
    if workers > 1:
        # Spawned worker processes start from the factory alone: it sets their logging up at this level.
        os.environ["CBORG_LOG_LEVEL"] = log_level
        uvicorn.run("router.app:create_worker_app", factory=True, workers=workers, **kw)
    else:
        from router.app import create_app, freeze_start_up
        uvicorn.run(freeze_start_up(create_app(settings)), **kw)


def cmd_router(a) -> None:
    run_router(a.host, a.port, a.workers, a.log_level)


def cmd_serve(a) -> None:
    """The gateway and a local inference node (CPU profile by default)."""
    from cborg.serve import serve
    serve(a.host, a.port, a.profile, a.node_port, a.log_level)


# -- node -----------------------------------------------------------------------------------
def cmd_node(a) -> None:
    from inference.config import ConfigError, load_inference
    from inference.node import run_node
    from router.catalog import default_config_path

    try:
        conf = load_inference(os.environ.get("CBORG_CONFIG") or default_config_path(), a.profile)
        conf.node(a.name)
    except ConfigError as e:
        _die(str(e))
    run_node(conf, a.name, a.host, a.port, a.log_level)


# -- models (through the gateway's admin API) -----------------------------------------------
def cmd_models(a) -> None:
    from cborg.models_cli import run
    sys.exit(run(a))


# -- keys -----------------------------------------------------------------------------------
def _store():
    from router.config import Settings
    from router.store import open_store
    return open_store(Settings.from_env().database_url)


def _fmt_time(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


_DEFAULT = "default"      # a limit option's value that clears the setting: models.yaml's default applies
_LIMIT_OPTIONS = (("parallel", "max_parallel"), ("rpm", "rpm"), ("tpm", "tpm"), ("budget", "max_budget"),
                  ("budget_period", "budget_period"))


def _limit_value(conv):
    """argparse type of a limit option: a number, or 'default'."""
    def parse(v: str):
        return _DEFAULT if v.strip().lower() == _DEFAULT else conv(v)
    parse.__name__ = conv.__name__
    return parse


def _limit_fields(a) -> dict:
    out = {}
    for attr, field in _LIMIT_OPTIONS:
        v = getattr(a, attr, None)
        if v is not None:
            out[field] = None if v == _DEFAULT else v
    return out


def _key_fields(a) -> dict:
    out = _limit_fields(a)
    for attr in ("alias", "models"):
        v = getattr(a, attr, None)
        if v is not None:
            out[attr] = v
    if getattr(a, "expires", None) is not None:
        out["expires"] = a.expires
    return out


def _catalog():
    """The catalog (CBORG_CONFIG), to check a key's model names; None (with a warning) if unreadable."""
    from router.catalog import ConfigError, load_catalog
    from router.config import Settings

    path = Settings.from_env().config_path
    try:
        return load_catalog(path)
    except (ConfigError, OSError):
        print(f"cborg: warning: cannot read the catalog {path}; model names not checked", file=sys.stderr)
        return None


async def _keys(a) -> int:
    from router.control.schemas import KeyFields
    from router.key_admin import KeyInputError, canonical_models, create_key, find_key, revoke_key, validate

    store = _store()
    await store.init()
    try:
        if a.keys_cmd == "create":
            try:
                secret, rec = await create_key(store, a.user, fields=_key_fields(a), catalog=_catalog())
            except KeyInputError as e:
                _die(str(e))
            print(secret)
            print(f"# id {rec.id}, user {rec.user_id}, expires {_fmt_time(rec.expires_at)}. "
                  "The key is shown only now; it is stored as a hash.", file=sys.stderr)
            return 0
        if a.keys_cmd == "list":
            keys = await store.list_keys(a.user)
            for k in keys:
                state = "revoked" if k.revoked_at else "blocked" if k.blocked else \
                    "expired" if k.expires_at and k.expires_at < time.time() else "active"
                print(f"{k.id}  {k.key_hint}  {k.user_id}  {k.alias or '-'}  {state}  "
                      f"expires {_fmt_time(k.expires_at)}  models {','.join(k.models) or 'all'}  spend ${k.spend:.4f}")
            return 0
        rec = await find_key(store, a.key)
        if rec is None:
            _die(f"no key matches {a.key[:6] + '...' if a.key.startswith('sk-') else a.key}", 1)
        if a.keys_cmd == "info":
            print(json.dumps(rec.public(), indent=2, default=str))
        elif a.keys_cmd == "revoke":
            await revoke_key(store, rec.id)
            print(f"revoked {rec.id}; every gateway replica refuses it within a few seconds")
        elif a.keys_cmd in ("block", "unblock"):
            await store.update_key(rec.id, {"blocked": a.keys_cmd == "block"})
            print(f"{a.keys_cmd}ed {rec.id}")
        elif a.keys_cmd == "update":
            try:
                changes = validate(KeyFields, _key_fields(a)).changes()
                cat = _catalog()
                if cat is not None:
                    canonical_models(cat, changes)
            except KeyInputError as e:
                _die(str(e))
            rec = await store.update_key(rec.id, changes)
            print(json.dumps(rec.public(), indent=2, default=str))
        return 0
    finally:
        await store.close()


def cmd_keys(a) -> None:
    sys.exit(asyncio.run(_keys(a)))


# -- users ----------------------------------------------------------------------------------
async def _users(a) -> int:
    from router.catalog import load_catalog
    from router.config import Settings
    from router.control.schemas import UserUpdate
    from router.key_admin import KeyInputError, validate
    from router.limits.policy import Policy
    from router.store.base import USER_LIMIT_FIELDS

    store = _store()
    await store.init()
    try:
        if a.users_cmd == "update":
            try:
                changes = validate(UserUpdate, {"user_id": a.user, **_limit_fields(a)}).changes()
            except KeyInputError as e:
                _die(str(e))
            if not changes:
                _die("nothing to change: give --parallel, --rpm, --tpm, --budget or --budget-period")
            await store.update_user(a.user, changes)
        user = await store.get_user(a.user)
        keys = await store.list_keys(a.user)
        if user is None and not keys:
            _die(f"no such user: {a.user}", 1)
        c = Policy(load_catalog(Settings.from_env().config_path).conf.limits).user_check(a.user, user=user)
        print(json.dumps({"user_id": a.user, "spend": user.spend if user else 0.0,
                          "budget_reset_at": _fmt_time(user.budget_reset_at) if user and user.budget_reset_at else None,
                          "applies": {"max_parallel": c.parallel, "rpm": c.rpm, "tpm": c.tpm, "max_budget": c.budget,
                                      "budget_period_s": c.period_s},
                          "set_for_this_user": {f: getattr(user, f) for f in USER_LIMIT_FIELDS
                                                if user is not None and getattr(user, f) is not None},
                          "keys": [k.id for k in keys]}, indent=2))
        if a.users_cmd == "update":
            print("# every gateway replica applies it within a few seconds", file=sys.stderr)
        return 0
    finally:
        await store.close()


def cmd_users(a) -> None:
    sys.exit(asyncio.run(_users(a)))


# -- parser ---------------------------------------------------------------------------------
def _add_key_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", help="a name for the key")
    p.add_argument("--models", help="comma-separated model names the key may use (default: all)")
    p.add_argument("--expires", help="lifetime, e.g. 365d, 12h, never (default 365d)")
    _add_limits(p)


def _add_limits(p: argparse.ArgumentParser) -> None:
    """Limit options of keys and users; 'default' clears one (models.yaml's applies again)."""
    p.add_argument("--parallel", type=_limit_value(int), help="max parallel requests (or 'default')")
    p.add_argument("--rpm", type=_limit_value(int), help="requests per minute (or 'default')")
    p.add_argument("--tpm", type=_limit_value(int), help="tokens per minute (or 'default')")
    p.add_argument("--budget", type=_limit_value(float),
                   help="budget in USD per period, commercial models only (or 'default')")
    p.add_argument("--budget-period", type=_limit_value(str), help="budget period, e.g. 30d (or 'default')")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cborg", description="CBorg AI API gateway and inference node")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("router", help="run the gateway alone")
    p.add_argument("--host", default=os.environ.get("CBORG_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("CBORG_PORT", "8000")))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_router)

    p = sub.add_parser("serve", help="run the gateway with a local CPU inference node")
    p.add_argument("--host", default=os.environ.get("CBORG_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("CBORG_PORT", "8000")))
    p.add_argument("--profile", help="models.yaml profile of the local node (default: cpu)")
    p.add_argument("--node-port", type=int, help="the local node's admin port (default: the profile's)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("node", help="run an inference node: the engines of one server's deployments")
    p.add_argument("--profile", help="models.yaml profile (default: CBORG_PROFILE, else default_profile)")
    p.add_argument("--name", help="this node's name in the profile (needed when it has several)")
    p.add_argument("--host", help="admin API address (default: from the node's url)")
    p.add_argument("--port", type=int, help="admin API port (default: from the node's url)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_node)

    m = sub.add_parser("models", help="what runs where; load, unload, swap (gateway admin API, CBORG_MASTER_KEY)")
    m.add_argument("--url", default=os.environ.get("CBORG_URL", "http://127.0.0.1:8000"), help="the gateway")
    ms = m.add_subparsers(dest="models_cmd", required=True)
    st = ms.add_parser("status", help="nodes, deployments and their states")
    st.add_argument("--json", action="store_true", help="the raw status")
    for name, helptext in (("load", "load a model's deployment (or a deployment by name)"),
                           ("unload", "drain and unload a model (or a deployment by name)")):
        x = ms.add_parser(name, help=helptext)
        x.add_argument("name", metavar="MODEL_OR_DEPLOYMENT")
        x.add_argument("--node", help="only on this node")
        x.add_argument("--no-wait", dest="wait", action="store_false", help="return once the node accepted")
        x.add_argument("--timeout", type=float, default=1800, help="longest wait, s (default 1800)")
    sw = ms.add_parser("swap", help="drain a model's deployment and load another in its place")
    sw.add_argument("name", metavar="MODEL")
    sw.add_argument("--to", required=True, metavar="DEPLOYMENT")
    sw.add_argument("--node", help="the node holding the deployment (default: the one that has it)")
    sw.add_argument("--no-wait", dest="wait", action="store_false")
    sw.add_argument("--timeout", type=float, default=1800)
    m.set_defaults(fn=cmd_models)

    k = sub.add_parser("keys", help="manage API keys (in CBORG_DATABASE_URL)")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", help="create a key and print it once")
    c.add_argument("--user", required=True, help="owner's e-mail")
    _add_key_limits(c)
    ls = ks.add_parser("list", help="list keys")
    ls.add_argument("--user")
    for name, helptext in (("info", "show a key"), ("revoke", "revoke a key for good"),
                           ("block", "block a key"), ("unblock", "unblock a key")):
        x = ks.add_parser(name, help=helptext)
        x.add_argument("key", metavar="KEY_OR_ID")
    u = ks.add_parser("update", help="change a key's models, limits or expiry")
    u.add_argument("key", metavar="KEY_OR_ID")
    _add_key_limits(u)
    k.set_defaults(fn=cmd_keys)

    us = sub.add_parser("users", help="a user's own limits and budget (in CBORG_DATABASE_URL)")
    uss = us.add_subparsers(dest="users_cmd", required=True)
    ui = uss.add_parser("info", help="a user's spend, the limits that apply, their keys")
    ui.add_argument("user", metavar="EMAIL")
    uu = uss.add_parser("update", help="set a user's limits (override models.yaml's limits.user)")
    uu.add_argument("user", metavar="EMAIL")
    _add_limits(uu)
    us.set_defaults(fn=cmd_users)

    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
