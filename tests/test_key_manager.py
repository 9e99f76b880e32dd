"""The Key Manager over HTTP (the browser tests drive the same pages in Chromium): cookies and
sessions, sign-in refusals, the self-service rules, CSRF and hostile input on every form and query,
the admin pages' checks; and the settings and models.yaml section behind them."""
from __future__ import annotations

import html
import os
import re
import stat

import httpx
import pytest
import yaml

from router.auth import hash_key
from router.config import Settings
from router.control.key_manager.sessions import session_secret
from tests.conftest import MASTER_KEY, running_gateway
from tests.helpers.identity import QUIET, oidc_provider, set_user, sign_in
from tests.helpers.servers import ROOT

pytestmark = QUIET

ADMIN = "admin@lbl.gov"
OIDC = {"oidc_client_id": "cborg", "oidc_client_secret": "secret-for-tests", "oidc_allowed_domains": ("lbl.gov",),
        "admin_emails": (ADMIN,)}


def self_service(models: list[str], max_keys: int = 3):
    def edit(conf):
        conf["key_manager"] = {"default_expiry": "90d", "max_expiry": "180d", "max_keys_per_user": max_keys,
                               "models": models}
    return edit


@pytest.fixture(scope="module")
def issuer():
    with oidc_provider() as url:
        yield url


@pytest.fixture(scope="module")
def site(mock_openai, tmp_path_factory, issuer):
    with running_gateway(tmp_path_factory.mktemp("km"), mock_openai, edit=self_service(["lbl/*", "openai/gpt-4o-mini"]),
                         oidc_issuer=issuer, **OIDC) as g:
        yield g


def csrf(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def client(g) -> httpx.Client:
    return httpx.Client(base_url=g.url, timeout=30)


def signed_in(g, email: str) -> tuple[httpx.Client, str]:
    c = client(g)
    r = sign_in(c, g.url, email)
    assert r.status_code == 200 and "Sign out" in r.text, r.text[:500]
    return c, csrf(r)


def keys_of(g, user: str):
    return g.run(g.gw.store.list_keys(user))


def notice(r: httpx.Response) -> str:
    m = re.search(r'class="notice [a-z]+" role="(?:alert|status)"[^>]*>(.*?)</p>', r.text, re.S)
    return m.group(1) if m else ""


# -- sessions ------------------------------------------------------------------------------------
def test_session_cookie_is_signed_httponly_samesite_and_scoped(site):
    r = client(site).get("/key/manage")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("cborg_km=") and "httponly" in cookie and "samesite=lax" in cookie
    assert "path=/key/manage;" in cookie and "Max-Age=43200" in cookie and "secure" not in cookie
    # over HTTPS (here: a proxy on loopback saying so) the cookie is Secure
    r = client(site).get("/key/manage", headers={"x-forwarded-proto": "https"})
    assert "secure" in r.headers["set-cookie"]
    # the API sets no cookie
    for path in ("/v1/models", "/health/liveliness", "/docs"):
        assert "set-cookie" not in client(site).get(path).headers
    # a tampered cookie is no session
    c, _ = signed_in(site, "tamper@lbl.gov")
    value = c.cookies["cborg_km"]
    c2 = client(site)
    c2.cookies.set("cborg_km", value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"), path="/key/manage")
    assert "Sign in with your lab account" in c2.get("/key/manage").text


def test_pages_have_a_strict_content_security_policy(site):
    r = client(site).get("/key/manage")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
    assert r.headers["cache-control"] == "no-store"
    assert not re.search(r"<script>|\son[a-z]+=|style=", r.text)       # nothing inline the policy would block
    js = client(site).get("/key/manage/static/km.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]


def test_session_secret_sources(tmp_path):
    s = Settings(config_path=ROOT / "models.yaml", database_url="sqlite://", session_secret="from-env-0123456789")
    assert session_secret(s, tmp_path) == ("from-env-0123456789", "CBORG_SESSION_SECRET")
    s.session_secret, s.master_key = None, "mk-one-0123456789"
    one, where = session_secret(s, tmp_path)
    assert where == "derived from CBORG_MASTER_KEY" and MASTER_KEY not in one
    s.master_key = "mk-two-0123456789"
    assert session_secret(s, tmp_path)[0] != one              # a new master key signs everyone out
    s.master_key = None
    made, where = session_secret(s, tmp_path)
    assert where == str(tmp_path / "session-secret") and len(made) >= 40
    assert session_secret(s, tmp_path)[0] == made             # kept: restarts agree
    assert stat.S_IMODE(os.stat(tmp_path / "session-secret").st_mode) == 0o600


# -- signing in ----------------------------------------------------------------------------------
def test_refused_sign_ins(site, issuer):
    set_user(issuer, "unverified@lbl.gov", email_verified=False)
    r = sign_in(client(site), site.url, "unverified@lbl.gov")
    assert r.status_code == 403 and "may not use this service" in r.text
    for i, claim in enumerate(("false", 0, "0", None, "yes")):     # some providers send strings
        set_user(issuer, f"unverified{i}@lbl.gov", email_verified=claim)
        r = sign_in(client(site), site.url, f"unverified{i}@lbl.gov")
        assert r.status_code == 403, claim
    set_user(issuer, "verified@lbl.gov", email_verified=True)
    assert sign_in(client(site), site.url, "verified@lbl.gov").status_code == 200
    r = sign_in(client(site), site.url, "mallory@lbl.gov.evil.example")      # a look-alike domain
    assert r.status_code == 403
    # the provider says no
    c = client(site)
    r = c.get("/key/manage/login")
    r = httpx.post(r.headers["location"], data={"action": "deny"})
    r = c.get(r.headers["location"])
    assert r.status_code == 401 and "cancelled or refused" in r.text
    # a callback this browser did not start (a forged or replayed state)
    r = client(site).get("/key/manage/callback?code=abc&state=forged")
    assert r.status_code == 401 and "did not complete" in r.text


def test_who_is_admin_is_decided_at_every_request(site):
    c, _ = signed_in(site, ADMIN)
    assert c.get("/key/manage/admin/users").status_code == 200
    site.gw.settings.admin_emails = ()
    try:
        r = c.get("/key/manage/admin/users")
        assert r.status_code == 403 and "administrators" in r.text
        assert c.get("/key/manage").status_code == 200            # still a researcher of lbl.gov
    finally:
        site.gw.settings.admin_emails = (ADMIN,)


def test_master_key_sign_in_where_oidc_is_not_configured(mock_openai, tmp_path):
    with running_gateway(tmp_path, mock_openai) as g:
        c = client(g)
        page = c.get("/key/manage")
        assert "CBORG_OIDC_ISSUER" in page.text and "/key/manage/callback" in page.text
        assert c.get("/key/manage/login").status_code == 404
        r = c.post("/key/manage/master-login", data={"csrf": csrf(page), "master_key": "mk-wrong-0123456789"})
        assert r.status_code == 401 and c.get("/key/manage/admin/users").status_code == 401
        r = c.post("/key/manage/master-login", data={"csrf": csrf(page), "master_key": MASTER_KEY},
                   follow_redirects=True)
        assert r.status_code == 200 and str(r.url).endswith("/key/manage/admin/users")
        assert MASTER_KEY not in str(c.cookies.jar) and MASTER_KEY not in r.text
        tok = csrf(r)
        r = c.get("/key/manage")
        assert r.status_code == 303 and r.headers["location"] == "/key/manage/admin"
        r = c.post("/key/manage/keys", data={"csrf": tok, "alias": "x"})
        assert r.status_code == 403 and "no keys of its own" in r.text
        g.gw.settings.master_key = "mk-rotated-0123456789"       # a new master key ends the session
        assert c.get("/key/manage/admin/users").status_code == 401


# -- a researcher's keys -------------------------------------------------------------------------
def test_self_service_keys_stay_within_the_labs_rules(site):
    c, tok = signed_in(site, "rules@lbl.gov")

    def make(**form) -> httpx.Response:
        return c.post("/key/manage/keys", data={"csrf": tok, **form})

    r = make(alias="x", expiry="365d")                     # longer than max_expiry (180d)
    assert r.status_code == 400 and "expiry: choose one of 7d, 30d, 90d, 180d" in notice(r)
    r = make(alias="x", models="openai/gpt-4o")            # not among key_manager.models
    assert r.status_code == 400 and "openai/gpt-4o" in notice(r)
    r = make(alias="x", models="no/such-model")
    assert r.status_code == 400 and "no/such-model" in notice(r)
    r = make(alias="bad\x00name")
    assert r.status_code == 400 and "key_alias" in notice(r)
    r = make(alias="y" * 300)
    assert r.status_code == 400 and "key_alias" in notice(r)
    assert keys_of(site, "rules@lbl.gov") == []           # nothing stored
    r = make(alias="plain")                                # the lab's list, its default expiry
    assert r.status_code == 201
    [k] = keys_of(site, "rules@lbl.gov")
    assert k.models == ["lbl/*", "openai/gpt-4o-mini"] and 89 * 86400 < k.expires_at - k.created_at <= 90 * 86400
    r = make(alias="two", models=["lbl/cborg-chat", "openai/gpt-4o-mini"], expiry="7d")
    assert r.status_code == 201
    assert sorted(keys_of(site, "rules@lbl.gov"), key=lambda k: k.created_at)[1].models == \
        ["lbl/cborg-chat:latest", "openai/gpt-4o-mini"]        # canonical names, as the key check compares
    assert make(alias="three").status_code == 201
    r = make(alias="four")                                 # max_keys_per_user: 3
    assert r.status_code == 400 and "You hold 3 keys" in notice(r)
    first = keys_of(site, "rules@lbl.gov")[0]
    assert c.post(f"/key/manage/keys/{first.id}/revoke", data={"csrf": tok}).status_code == 303
    assert make(alias="four").status_code == 201          # a revoked key makes room


def test_a_blocked_key_is_no_way_to_a_new_one(site):
    c, tok = signed_in(site, "blocked@lbl.gov")
    assert c.post("/key/manage/keys", data={"csrf": tok, "alias": "mine"}).status_code == 201
    [k] = keys_of(site, "blocked@lbl.gov")
    assert site.admin("POST", "/key/block", json={"key": k.id}).status_code == 200
    assert c.post(f"/key/manage/keys/{k.id}/revoke", data={"csrf": tok}).status_code == 303   # revoking is fine
    r = c.post("/key/manage/keys", data={"csrf": tok, "alias": "again"})
    assert r.status_code == 400 and "blocked one of your keys" in r.text
    assert len(keys_of(site, "blocked@lbl.gov")) == 1


def test_nobody_revokes_someone_elses_key(site):
    victim = site.new_key("victim@lbl.gov")
    rec = site.run(site.gw.store.key_by_hash(hash_key(victim)))
    c, tok = signed_in(site, "other@lbl.gov")
    for ref in (rec.id, rec.key_hash, victim):
        r = c.post(f"/key/manage/keys/{ref}/revoke", data={"csrf": tok})
        assert r.status_code == 404
    r = c.post(f"/key/manage/admin/keys/{rec.id}/revoke", data={"csrf": tok})
    assert r.status_code == 403
    assert httpx.get(site.url + "/v1/models", headers={"Authorization": f"Bearer {victim}"}).status_code == 200


@pytest.mark.parametrize("path", ["/key/manage/keys", "/key/manage/logout", "/key/manage/keys/key-1/revoke",
                                  "/key/manage/admin/user/limits", "/key/manage/admin/keys/key-1/block",
                                  "/key/manage/admin/models/swap", "/key/manage/master-login"])
def test_every_form_wants_its_csrf_token(site, path):
    c, tok = signed_in(site, ADMIN)
    for data in ({}, {"csrf": ""}, {"csrf": tok[:-1]}, {"csrf": tok + "x"}, {"csrf": ["a", "b"]}):
        r = c.post(path, data=data)
        assert r.status_code == 403 and "did not come from your Key Manager page" in r.text, (path, data)
    r = c.post(path, content=b'{"csrf": "%s"}' % tok.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 403


def test_anonymous_visitors_are_sent_to_sign_in(site):
    c = client(site)
    for path in ("/key/manage/admin/users", "/key/manage/admin/keys", "/key/manage/admin/models",
                 "/key/manage/admin/user?u=a@lbl.gov"):
        r = c.get(path)
        assert r.status_code == 401 and 'href="/key/manage"' in r.text, path


# -- admin pages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("max_budget", "-1"), ("max_budget", "1e999"), ("max_budget", "nan"),
                                         ("max_budget", "lots"), ("rpm_limit", "1.5"), ("tpm_limit", "-3"),
                                         ("max_parallel_requests", "9" * 40), ("budget_duration", "0d"),
                                         ("budget_duration", "soon"), ("budget_duration", "1000y")])
def test_user_limits_are_checked_as_user_update_checks_them(site, field, value):
    c, tok = signed_in(site, ADMIN)
    r = c.post("/key/manage/admin/user/limits", data={"csrf": tok, "user_id": "limits@lbl.gov", field: value},
               follow_redirects=True)
    assert r.status_code == 200 and f"Not saved: {field}" in notice(r), notice(r)
    assert site.run(site.gw.store.get_user("limits@lbl.gov")) is None
    api = site.admin("POST", "/user/update", json={"user_id": "limits@lbl.gov", field: value})
    assert api.status_code == 400 and api.json()["error"]["param"] == field      # the API says the same


def test_user_limits_saved_and_reset_to_the_default(site):
    c, tok = signed_in(site, ADMIN)
    r = c.post("/key/manage/admin/user/limits", follow_redirects=True,
               data={"csrf": tok, "user_id": "lim2@lbl.gov", "max_budget": "7.5", "budget_duration": "7d",
                     "rpm_limit": "60"})
    assert "Limits of lim2@lbl.gov saved" in notice(r)
    info = site.admin("GET", "/user/info?user_id=lim2@lbl.gov").json()["user_info"]
    assert (info["max_budget"], info["budget_duration"], info["rpm_limit"]) == (7.5, "7d", 60)
    c.post("/key/manage/admin/user/limits", data={"csrf": tok, "user_id": "lim2@lbl.gov", "rpm_limit": "60"})
    info = site.admin("GET", "/user/info?user_id=lim2@lbl.gov").json()["user_info"]
    assert (info["max_budget"], info["budget_duration"], info["rpm_limit"]) == (50.0, "30d", 60)


def test_saving_limits_returns_to_that_users_page(site):
    c, tok = signed_in(site, ADMIN)
    for user in ("first+ml@lbl.gov", "a&u=b@lbl.gov", "x#y@lbl.gov"):
        r = c.post("/key/manage/admin/user/limits", data={"csrf": tok, "user_id": user, "rpm_limit": "5"},
                   follow_redirects=True)
        assert f"Limits of {html.escape(user)} saved" in notice(r), notice(r)
        assert f"<h1>{html.escape(user)}</h1>" in r.text            # that user's page, not a look-alike's


def test_hostile_queries_get_pages_not_errors(site):
    c, _ = signed_in(site, ADMIN)
    for path in ("/key/manage/admin/keys?q=" + "a" * 20000, "/key/manage/admin/keys?q=%00%01",
                 "/key/manage/admin/keys?before=nan_x", "/key/manage/admin/keys?before=1e999_key",
                 "/key/manage/admin/keys?before=_", "/key/manage/admin/keys?q=%25&before=-1_%27",
                 "/key/manage/admin/users?q=%27%20OR%201%3D1--&after=%00", "/key/manage/admin/users?after=" + "z" * 5000,
                 "/key/manage/admin/user?u=", "/key/manage/admin/user?u=%00", "/key/manage/admin/user?u=nobody@lbl.gov"):
        r = c.get(path)
        assert r.status_code in (200, 404), (path, r.status_code)
        assert "Traceback" not in r.text and 'class="notice error"' not in r.text or r.status_code == 404


def test_actions_return_to_the_admin_page_they_came_from_never_elsewhere(site):
    site.new_key("ret@lbl.gov")
    [k] = keys_of(site, "ret@lbl.gov")
    c, tok = signed_in(site, ADMIN)
    for back, where in (("/key/manage/admin/keys?q=ret", "/key/manage/admin/keys?q=ret"),
                        ("https://evil.example/", "/key/manage/admin/keys"),
                        ("/key/manage/admin//evil.example", "/key/manage/admin/keys"),
                        ("/key/manage/admin/keys\r\nSet-Cookie: x=1", "/key/manage/admin/keys")):
        r = c.post(f"/key/manage/admin/keys/{k.id}/block", data={"csrf": tok, "back": back})
        assert r.status_code == 303 and r.headers["location"] == where
    r = c.post(f"/key/manage/admin/keys/{k.id}/explode", data={"csrf": tok})
    assert r.status_code == 404
    r = c.post("/key/manage/admin/models/swap", data={"csrf": tok, "model": "lbl/llama", "to": "nowhere"},
               follow_redirects=True)
    assert "Not done:" in notice(r)


# -- models.yaml -----------------------------------------------------------------------------------
@pytest.mark.parametrize("section,words", [
    ({"default_expiry": "400d", "max_expiry": "365d"}, ["key_manager", "longer than max_expiry"]),
    ({"default_expiry": "never"}, ["key_manager", "default_expiry"]),
    ({"max_keys_per_user": 0}, ["key_manager.max_keys_per_user"]),
    ({"models": ["lbl/ghost"]}, ["key_manager.models", "lbl/ghost"]),
    ({"expiry": "30d"}, ["key_manager.expiry"]),
])
def test_key_manager_config_errors_name_the_field(tmp_path, section, words):
    from router.catalog import ConfigError, load_catalog
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    conf["key_manager"] = section
    for a in conf["aliases"]:
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    p = tmp_path / "models.yaml"
    p.write_text(yaml.safe_dump(conf))
    with pytest.raises(ConfigError) as e:
        load_catalog(p)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_settings_from_the_environment():
    s = Settings.from_env({"CBORG_OIDC_ISSUER": "https://login.lbl.gov/", "CBORG_OIDC_CLIENT_ID": "cborg",
                           "CBORG_OIDC_ALLOWED_DOMAINS": "lbl.gov, LBL.GOV es.net",
                           "CBORG_ADMIN_EMAILS": "Boss@lbl.gov,ops@lbl.gov", "CBORG_SESSION_SECRET": "x" * 40})
    assert s.oidc_issuer == "https://login.lbl.gov" and s.oidc_client_secret is None
    assert s.oidc_allowed_domains == ("lbl.gov", "lbl.gov", "es.net")
    assert s.admin_emails == ("boss@lbl.gov", "ops@lbl.gov") and s.session_secret == "x" * 40
