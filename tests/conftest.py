"""Shared fixtures: provider mocks and a real gateway on loopback ports."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.servers import ROOT, AiohttpServer, ASGIServer
from tests.mocks.openai_mock import MockOpenAI

MASTER_KEY = "mk-test-master-key-0123456789"

# httpx logs every request at INFO: a failing test's captured log was hundreds of readiness polls
logging.getLogger("httpx").setLevel(logging.WARNING)


def write_catalog(path: Path, mock_url: str, edit=None) -> Path:
    """The repo's models.yaml with lbl/* pointed at the mock (as an admin's existing vLLM would be)."""
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    for m in conf["models"]:
        if m["provider"] == "lbl":
            m["base_url"] = mock_url + "/v1"
            m["api_key_env"] = "LBL_VLLM_KEY"
    for a in conf.get("aliases", []):
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    if edit:
        edit(conf)
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def provider_env(mock: MockOpenAI) -> dict[str, str]:
    return {"OPENAI_API_KEY": mock.api_key, "OPENAI_BASE_URL": mock.url + "/v1",
            "XAI_API_KEY": mock.api_key, "XAI_BASE_URL": mock.url + "/v1",
            "LBL_VLLM_KEY": mock.api_key}


@pytest.fixture(scope="session")
def mock_openai():
    mock = MockOpenAI()
    with AiohttpServer(mock.app) as srv:
        mock.url = srv.url
        yield mock


@pytest.fixture(autouse=False)
def fresh_mock(mock_openai):
    mock_openai.reset()
    yield mock_openai
    mock_openai.reset()


class GatewayUnderTest:
    def __init__(self, server: ASGIServer, db_url: str):
        self.server = server
        self.url = server.url
        self.gw = server.app.state
        self.db_url = db_url

    def run(self, coro, timeout: float = 30):
        """Run a coroutine on the gateway's own event loop (its store and limiter live there)."""
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.gw.loop).result(timeout)

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {MASTER_KEY}"},
                             timeout=30, **kw)

    def new_key(self, user: str = "researcher@lbl.gov", **fields) -> str:
        r = self.admin("POST", "/key/generate", json={"user_id": user, **fields})
        assert r.status_code == 200, r.text
        return r.json()["key"]


@contextlib.contextmanager
def running_gateway(tmp: Path, mock: MockOpenAI, edit=None, env: dict | None = None, db: str | None = None,
                    **settings_kw):
    """A gateway in this process on a free port; `edit` changes the catalog, `env` the provider env."""
    from router.app import create_app
    from router.config import Settings

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = write_catalog(tmp / "models.yaml", mock.url, edit)
    db = db or f"sqlite:///{tmp / 'cborg.db'}"
    kw = {"master_key": MASTER_KEY, "max_body_bytes": 1024 * 1024, **settings_kw}
    settings = Settings(config_path=cfg, database_url=db, env=provider_env(mock) if env is None else env, **kw)
    app = create_app(settings)
    with ASGIServer(app) as srv:
        yield GatewayUnderTest(srv, db)


@contextlib.contextmanager
def gateway_replicas(tmp: Path, mock: MockOpenAI, n: int, env: dict):
    """n gateway processes on one catalog and database (env: CBORG_DATABASE_URL etc.); yields their URLs."""
    from tests.helpers.servers import free_port, gateway_proc, wait_http
    cfg = write_catalog(tmp / "models.yaml", mock.url)
    full = {**provider_env(mock), "CBORG_CONFIG": str(cfg), "CBORG_MASTER_KEY": MASTER_KEY, **env}
    ports = [free_port() for _ in range(n)]
    procs = [gateway_proc(p, full, tmp / f"gw{p}.log") for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for u, pr in zip(urls, procs):
            wait_http(u + "/health/readiness", proc=pr.p)
        yield urls
    finally:
        for pr in procs:
            pr.stop()


def admin_new_key(url: str, **fields) -> str:
    r = httpx.post(url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"}, json=fields)
    assert r.status_code == 200, r.text
    return r.json()["key"]


@pytest.fixture(scope="session")
def gateway(mock_openai, tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("gw"), mock_openai) as g:
        yield g


@pytest.fixture(scope="session")
def api_key(gateway):
    return gateway.new_key()


def require_services() -> bool:
    return os.environ.get("CBORG_REQUIRE_SERVICES") == "1"


# -- the real PostgreSQL and Redis of this machine (../shared/notes/services.md) ------------------
PG_BASE = os.environ.get("CBORG_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("CBORG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _service_missing(what: str, err: Exception):
    msg = f"{what} is not reachable ({err}); start it (../shared/notes/services.md)"
    if require_services():
        pytest.fail(msg + " - CBORG_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(msg)


@pytest.fixture
def pg_url():
    """A fresh schema in the test database; the URL selects it with ?search_path=."""
    import asyncio
    import uuid

    import asyncpg
    schema = "t_" + uuid.uuid4().hex[:12]

    async def run(sql: str):
        c = await asyncpg.connect(PG_BASE, timeout=5)
        try:
            await c.execute(sql)
        finally:
            await c.close()
    try:
        asyncio.run(run(f"CREATE SCHEMA {schema}"))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
        _service_missing("PostgreSQL", e)
    yield f"{PG_BASE}?search_path={schema}"
    asyncio.run(run(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


@pytest.fixture
def redis_url():
    """The Redis URL; each test gets its own key prefix through CBORG_REDIS_PREFIX (see redis_prefix)."""
    import socket
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                raise OSError("no PONG")
    except OSError as e:
        _service_missing("Redis", e)
    return REDIS_BASE


@pytest.fixture
def redis_prefix():
    import uuid
    return f"t{uuid.uuid4().hex[:10]}:"
