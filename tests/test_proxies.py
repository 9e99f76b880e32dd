"""Egress proxies: the environment read as curl reads it (router/proxies.py), and a real forward proxy
(Debian's tinyproxy) on loopback between the gateway and an upstream."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from router.proxies import bypassed, choose, from_env
from router.targets import Proxy, Target
from tests.conftest import provider_env, require_services, running_gateway
from tests.helpers.servers import free_port


@pytest.mark.parametrize("host,port,no_proxy,want", [
    ("api.openai.com", 443, "*", True),
    ("api.openai.com", 443, "openai.com", True),
    ("api.openai.com", 443, ".openai.com", True),
    ("api.openai.com", 443, "*.openai.com", True),
    ("openai.com", 443, ".openai.com", True),
    ("notopenai.com", 443, "openai.com", False),
    ("API.OpenAI.com.", 443, "example.org, openai.com", True),
    ("api.openai.com", 443, "example.org api.openai.com", True),
    ("api.openai.com", 443, "api.openai.com:8443", False),
    ("api.openai.com", 8443, "api.openai.com:8443", True),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("10.1.2.3", 80, "10.1.2.3", True),
    ("11.1.2.3", 80, "10.0.0.0/8", False),
    ("::1", 80, "::1", True),
    ("::1", 8000, "[::1]:8000", True),
    ("::1", 8001, "[::1]:8000", False),
    ("127.0.0.1", 80, "localhost", False),          # curl does not resolve names to compare addresses
    ("api.openai.com", 443, "", False),
])
def test_no_proxy_as_curl_reads_it(host, port, no_proxy, want):
    assert bypassed(host, port, no_proxy) is want


def test_environment_proxy_choice():
    https, http = Target.parse("https://api.openai.com/v1"), Target.parse("http://10.0.0.5:8000/v1")
    env = {"HTTPS_PROXY": "http://u:p%40ss@proxy.lbl.gov:3128", "http_proxy": "proxy2.lbl.gov:8080",
           "NO_PROXY": "10.0.0.0/8"}
    p = from_env(https, env)
    assert p.url == "http://proxy.lbl.gov:3128" and (p.user, p.password) == ("u", "p@ss")
    assert "p@ss" not in repr(p) and "p@ss" not in repr(choose(https, None, False, env))
    assert from_env(http, env) is None                                  # NO_PROXY by CIDR
    assert from_env(http, {"http_proxy": "proxy2.lbl.gov"}).url == "http://proxy2.lbl.gov:1080"  # curl's port
    assert from_env(https, {"ALL_PROXY": "http://all:3128"}).url == "http://all:3128"
    assert from_env(https, {"all_proxy": "http://lower:1", "ALL_PROXY": "http://upper:2"}).url == "http://lower:1"
    assert from_env(https, {"HTTP_PROXY": "http://only-http:1"}) is None   # an https upstream reads HTTPS_PROXY
    with pytest.raises(ValueError) as e:
        from_env(https, {"ALL_PROXY": "socks5://u:secret@s:1080"})
    assert "ALL_PROXY" in str(e.value) and "secret" not in str(e.value) and "socks" in str(e.value)
    # models.yaml wins; local providers go direct unless configured
    assert choose(https, "direct", False, env).proxy is None
    assert choose(https, "http://cfg:9", False, env).proxy.url == "http://cfg:9"
    assert choose(http, None, True, {"HTTP_PROXY": "http://p:1"}).proxy is None
    assert choose(http, "http://cfg:9", True, {}).proxy.url == "http://cfg:9"


def test_models_yaml_proxy_is_validated_without_echoing_credentials(tmp_path):
    from common.validation import ConfigError
    from router.catalog import load_catalog
    from tests.conftest import write_catalog

    def bad(conf):
        conf["providers"]["openai"]["proxy"] = "socks5://admin:hunter2@proxy:1080"
    p = write_catalog(tmp_path / "models.yaml", "http://127.0.0.1:9", bad)
    with pytest.raises(ConfigError) as e:
        load_catalog(p)
    assert "providers.openai.proxy" in str(e.value) and "hunter2" not in str(e.value)


# -- a real forward proxy -------------------------------------------------------------------------
def _tinyproxy() -> str | None:
    return shutil.which("tinyproxy") or next((p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy")
                                              if Path(p).exists()), None)


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory):
    """tinyproxy on a free loopback port, wanting Basic credentials; yields (port, log path)."""
    exe = _tinyproxy()
    if exe is None:
        msg = "tinyproxy is not installed (Debian: apt-get install tinyproxy; scripts/test installs it as root)"
        if require_services():
            pytest.fail(msg + " - CBORG_REQUIRE_SERVICES=1 forbids skipping")
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("tinyproxy")
    port = free_port()
    log = tmp / "tinyproxy.log"
    (tmp / "tinyproxy.conf").write_text(f"""Port {port}
Listen 127.0.0.1
Timeout 60
MaxClients 50
Allow 127.0.0.1
BasicAuth cborg s3cr3t-proxy-pass
ViaProxyName "tinyproxy"
LogFile "{log}"
LogLevel Info
""")
    p = subprocess.Popen([exe, "-d", "-c", str(tmp / "tinyproxy.conf")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 10
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"tinyproxy did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        yield port, log
    finally:
        p.terminate()
        p.wait(5)


def _via(mock) -> str:
    """The Via header of the mock's last request ("" without one): proxies add it."""
    return next((v for k, v in mock.requests[-1]["headers"].items() if k.lower() == "via"), "")


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_openai_model_answers_through_the_proxy_and_no_proxy_is_honoured(tmp_path, fresh_mock, tinyproxy):
    port, log = tinyproxy
    env = {**provider_env(fresh_mock), "HTTP_PROXY": f"http://cborg:s3cr3t-proxy-pass@127.0.0.1:{port}"}
    with running_gateway(tmp_path / "via", fresh_mock, env=env) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0)
        r = client.chat.completions.create(model="openai/gpt-4o", **CHAT)
        assert r.choices[0].message.content
        assert "tinyproxy" in _via(fresh_mock)           # it went through the proxy
        s = client.chat.completions.create(model="openai/gpt-4o", stream=True, **CHAT)
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        # a local model (lbl/*, local: true) goes direct though HTTP_PROXY is set
        client.chat.completions.create(model="lbl/cborg-chat", **CHAT)
        assert _via(fresh_mock) == ""
    env["NO_PROXY"] = f"example.org, 127.0.0.1:{fresh_mock.url.rsplit(':', 1)[1]}"
    with running_gateway(tmp_path / "direct", fresh_mock, env=env) as gw:
        client = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url + "/v1", max_retries=0)
        client.chat.completions.create(model="openai/gpt-4o", **CHAT)
        assert _via(fresh_mock) == ""                           # NO_PROXY named host:port
    assert "s3cr3t-proxy-pass" not in log.read_text()


@pytest.fixture
def proxy_407():
    """A proxy that refuses every request with 407 Proxy Authentication Required."""
    import socketserver
    import threading

    class H(socketserver.StreamRequestHandler):
        def handle(self):
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_refusing_proxy_is_a_clear_502_without_credentials(tmp_path, fresh_mock, proxy_407, caplog):
    dead = free_port()
    cases = {f"http://cborg:s3cr3t-proxy-pass@127.0.0.1:{dead}": f"127.0.0.1:{dead}",      # nothing listens
             f"http://cborg:wrong-pass-123@127.0.0.1:{proxy_407}": f"127.0.0.1:{proxy_407}"}  # 407
    for i, (proxy, where) in enumerate(cases.items()):
        env = {**provider_env(fresh_mock), "HTTP_PROXY": proxy}
        with running_gateway(tmp_path / str(i), fresh_mock, env=env) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.new_key()}"},
                           json={"model": "openai/gpt-4o", **CHAT}, timeout=30)
        assert r.status_code == 502, r.text
        msg = r.json()["error"]["message"]
        assert f"proxy http://{where}" in msg, msg
        assert "pass" not in r.text and "cborg:" not in r.text, r.text
    assert "s3cr3t-proxy-pass" not in caplog.text and "wrong-pass-123" not in caplog.text


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    """An OpenAI-shaped upstream over TLS on loopback, its self-signed certificate in a PEM file."""
    import asyncio
    import ssl
    import threading

    from aiohttp import web
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def chat(req):
        await req.read()
        return web.json_response({"id": "chatcmpl-tls", "object": "chat.completion", "created": 1700000000,
                                  "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": {
                                      "role": "assistant", "content": "over TLS"}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start())
        loop.run_forever()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 10
    while True:
        try:
            httpx.get(f"https://127.0.0.1:{port}/", verify=ssl.create_default_context(cafile=str(cert)), timeout=1)
            break
        except httpx.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    yield f"https://127.0.0.1:{port}", cert
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_https_upstream_through_the_proxy_by_connect(tmp_path, mock_openai, tinyproxy, tls_upstream):
    """The usual case (commercial APIs are https): a CONNECT tunnel through the proxy, TLS to the
    upstream inside it, verified against SSL_CERT_FILE. A gateway process: the certificate store is
    read at start-up."""
    from tests.conftest import MASTER_KEY, admin_new_key, write_catalog
    from tests.helpers.servers import gateway_proc, wait_http
    port, log = tinyproxy
    url, cert = tls_upstream
    env = {**provider_env(mock_openai), "OPENAI_BASE_URL": url + "/v1", "SSL_CERT_FILE": str(cert),
           "HTTPS_PROXY": f"http://cborg:s3cr3t-proxy-pass@127.0.0.1:{port}",
           "CBORG_CONFIG": str(write_catalog(tmp_path / "models.yaml", mock_openai.url)),
           "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'cborg.db'}", "CBORG_MASTER_KEY": MASTER_KEY}
    gport = free_port()
    gw = gateway_proc(gport, env, tmp_path / "gw.log")
    try:
        base = f"http://127.0.0.1:{gport}"
        wait_http(base + "/health/readiness", proc=gw.p)
        client = openai.OpenAI(api_key=admin_new_key(base, user_id="researcher@lbl.gov"), base_url=base + "/v1", max_retries=0)
        for _ in range(3):
            r = client.chat.completions.create(model="openai/gpt-4o", **CHAT)
            assert r.choices[0].message.content == "over TLS"
    finally:
        gw.stop()
    tunnel = url.split("//")[1]
    # through one tunnel, kept alive for all three calls (the pool finds it again with the proxy's credentials)
    assert log.read_text().count(f"CONNECT {tunnel}") == 1, log.read_text()[-2000:]
    assert "s3cr3t-proxy-pass" not in gw.output() and "s3cr3t-proxy-pass" not in log.read_text()
