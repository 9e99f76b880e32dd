"""The Key Manager in a real browser: headless Chromium against a real gateway and a real OpenID
provider on loopback (oidc-provider-mock), keys used with the openai SDK against the provider mock,
and a model swapped on a real CPU node. Screenshots of each page go to CBORG_SCREENSHOTS when set
(docs/key-manager: `CBORG_SCREENSHOTS=docs/key-manager pytest tests/test_key_manager_browser.py`)."""
from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import running_gateway
from tests.helpers.browser import PHONE, chromium, require_browser, screenshot
from tests.helpers.identity import QUIET, oidc_provider, set_user

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600), *QUIET]

ALICE, BOB, ADMIN = "alice@lbl.gov", "bob@cs.lbl.gov", "admin@lbl.gov"
OIDC = {"oidc_client_id": "cborg-key-manager", "oidc_client_secret": "client-secret-for-tests",
        "oidc_allowed_domains": ("lbl.gov",), "admin_emails": (ADMIN,)}


class Site:
    def __init__(self, gw, issuer, tmp):
        self.gw, self.url, self.issuer, self.tmp = gw, gw.url, issuer, tmp

    def keys_of(self, user: str):
        return self.gw.run(self.gw.gw.store.list_keys(user))


@pytest.fixture(scope="module")
def site(mock_openai, tmp_path_factory):
    require_browser()
    tmp = tmp_path_factory.mktemp("key-manager")
    with oidc_provider() as issuer:
        set_user(issuer, ALICE, name="Alice Researcher")
        set_user(issuer, ADMIN, name="Ada Admin")
        with running_gateway(tmp / "gw", mock_openai, oidc_issuer=issuer, ledger_interval_s=0.1, **OIDC) as g:
            yield Site(g, issuer, tmp)


def wait(d, cond, timeout: float = 30):
    """Until cond() holds; an element the page's script has just replaced is looked for again."""
    return WebDriverWait(d, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: cond())


def sign_in(d, site: Site, email: str) -> None:
    """Through the sign-in button, the provider's form (the subject typed in) and back."""
    d.get(site.url + "/key/manage")
    d.find_element(By.ID, "signin").click()
    wait(d, lambda: d.current_url.startswith(site.issuer))
    q = parse_qs(urlsplit(d.current_url).query)
    assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) >= 43     # PKCE
    assert q["redirect_uri"] == [site.url + "/key/manage/callback"] and q["nonce"][0]
    box = d.find_element(By.NAME, "sub")
    box.send_keys(email)
    box.submit()
    wait(d, lambda: d.current_url.startswith(site.url + "/key/manage"))


def reload_until(d, url: str, cond, timeout: float = 15):
    """Load `url` again until `cond()` holds (the ledger is written every 0.1 s here)."""
    def check():
        d.get(url)
        return cond()
    return wait(d, check, timeout)


def accept_confirm(d) -> None:
    try:
        wait(d, lambda: d.switch_to.alert, 5).accept()
    except NoAlertPresentException:
        pass


def text(d) -> str:
    return d.find_element(By.TAG_NAME, "main").text


def no_horizontal_scroll(d) -> bool:
    return d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def unlabelled(d) -> list[str]:
    """Form fields and buttons a screen reader could not name."""
    return d.execute_script("""
      const out = [];
      for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea, button')) {
        const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') ||
                      el.getAttribute('aria-labelledby') || (el.tagName === 'BUTTON' && el.textContent.trim());
        if (!named) out.push(el.outerHTML.slice(0, 120));
      }
      return out;""")


def low_contrast(d) -> list[str]:
    """Text below WCAG AA's 4.5:1 against the background it is drawn on (SVG text aside)."""
    return d.execute_script("""
      const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(v => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
      const bg = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
        const a = c.match(/[\\d.]+/g); if (a && (a.length < 4 || +a[3] > 0)) return c; } return 'rgb(255,255,255)'; };
      const out = [];
      for (const el of document.querySelectorAll('body *')) {
        if (el.closest('svg') || !el.getClientRects().length) continue;
        if (![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
        const a = lum(getComputedStyle(el).color), b = lum(bg(el));
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < 4.5) out.push(el.tagName + ' "' + el.textContent.trim().slice(0, 40) + '" ' + ratio.toFixed(2));
      }
      return out;""")


def check_page(d) -> None:
    """What every page must be: fields and buttons named, text readable, no sideways scrolling."""
    assert unlabelled(d) == []
    assert low_contrast(d) == []
    assert no_horizontal_scroll(d)


def test_sign_in_page_without_a_session(site):
    with chromium() as d:
        d.get(site.url + "/key/manage")
        assert "Sign in with your lab account" in text(d)
        check_page(d)
        screenshot(d, "signin", site.tmp)


def test_researcher_makes_a_key_uses_it_sees_the_cost_and_revokes_it(site, fresh_mock):
    with chromium() as d:
        sign_in(d, site, ALICE)
        assert "Hello, Alice Researcher" in text(d)
        assert "No key yet" in text(d)
        check_page(d)
        # a key, made with the keyboard alone: type a name, pick the expiry, Enter
        d.find_element(By.ID, "alias").send_keys("notebook")
        Select(d.find_element(By.ID, "expiry")).select_by_value("30d")
        d.find_element(By.ID, "alias").send_keys(Keys.ENTER)
        wait(d, lambda: "Your new key" in d.title)
        secret = d.find_element(By.ID, "new-secret").get_attribute("value")
        assert secret.startswith("sk-") and secret in d.find_element(By.ID, "snippet-python").text
        assert site.url in d.find_element(By.ID, "snippet-claude").text
        d.find_element(By.CSS_SELECTOR, "[data-copy=new-secret]").click()
        wait(d, lambda: d.find_element(By.CSS_SELECTOR, "[data-copy=new-secret]").text == "Copied", 5)
        check_page(d)
        screenshot(d, "key-created", site.tmp)
        [rec] = site.keys_of(ALICE)
        assert rec.alias == "notebook" and 29 * 86400 < rec.expires_at - time.time() <= 30 * 86400
        assert rec.metadata == {"created_via": "key manager"}

        # the key works with the openai SDK, and the call's cost shows on the page
        client = openai.OpenAI(api_key=secret, base_url=site.url + "/v1", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
        cost = float(raw.headers["x-litellm-response-cost"])
        assert cost > 0

        def shown() -> float:
            row = d.find_element(By.CSS_SELECTOR, f"tr[data-key-id='{rec.id}']")
            return float(row.find_element(By.CSS_SELECTOR, "data.key-spend").get_attribute("value"))
        reload_until(d, site.url + "/key/manage", lambda: abs(shown() - cost) < 1e-12)
        assert float(d.find_element(By.ID, "spend").get_attribute("value")) == pytest.approx(cost)
        assert d.find_elements(By.CSS_SELECTOR, ".chart svg rect")          # today's bar
        assert "openai/gpt-4o-mini" in d.find_element(By.CSS_SELECTOR, ".legend").text
        check_page(d)

        # revoked: the SDK gets a 401 at once
        d.find_element(By.CSS_SELECTOR, f"tr[data-key-id='{rec.id}'] button.danger").click()
        accept_confirm(d)
        wait(d, lambda: "is revoked" in text(d))
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert "revoked" in str(e.value)
        assert "1 revoked key" in text(d)

        d.find_element(By.CSS_SELECTOR, ".signout button").click()
        wait(d, lambda: "Sign in with your lab account" in text(d))


def test_a_month_of_spend_in_the_chart(site):
    """Thirty days of calls to nine models: a bar for every day with spend, the seven biggest
    models in the legend and the rest as "other models", the table and the legend adding up."""
    import random

    from router.accounting.ledger import spend_deltas
    from router.auth import hash_key

    rnd = random.Random(5)
    user = "dana@lbl.gov"
    set_user(site.issuer, user, name="Dana Scientist")
    keys = [site.gw.run(site.gw.gw.store.key_by_hash(hash_key(site.gw.new_key(user, key_alias=a))))
            for a in ("laptop", "analysis pipeline")]
    models = ["anthropic/claude-sonnet", "openai/gpt-4.1", "openai/gpt-4o-mini", "google/gemini-flash",
              "anthropic/claude-haiku", "xai/grok-mini", "openai/o3-mini", "aws/llama-3.1-8b", "google/gemini-pro"]
    now, rows, quiet = time.time(), [], {3, 4, 10, 11, 17, 18, 24, 25}       # weekends off
    for day in range(30):
        if day in quiet:
            continue
        for i in range(rnd.randint(5, 25)):
            m = models[min(int(rnd.expovariate(0.45)), len(models) - 1)]
            k = rnd.choice(keys)
            rows.append((f"demo-{day}-{i}", now - day * 86400 - rnd.uniform(0, 3600), k.id, user, m, m, "demo",
                         2000, 0, 500, round(rnd.uniform(0.002, 0.12), 4), 200, 900.0, 300.0, 0, 0, "chat/completions"))
    site.gw.run(site.gw.gw.store.write_ledger(rows, *spend_deltas(rows, {}), now))
    first = int(now // 86400) - 29                 # the chart's UTC days
    shown_rows = [r for r in rows if r[1] // 86400 >= first]
    by_model: dict[str, float] = {}
    for r in shown_rows:
        by_model[r[4]] = by_model.get(r[4], 0.0) + r[10]
    with chromium() as d:
        sign_in(d, site, user)
        legend = d.find_elements(By.CSS_SELECTOR, ".legend li")
        names = [li.text.split(":")[0] for li in legend]
        top = sorted(by_model, key=lambda m: -by_model[m])[:7]
        assert names == top + ["other models"]
        shown = [float(li.find_element(By.TAG_NAME, "data").get_attribute("value")) for li in legend]
        assert sum(shown) == pytest.approx(sum(by_model.values()))
        assert shown[:7] == pytest.approx([by_model[m] for m in top])
        days = {int(r[1] // 86400) for r in shown_rows}
        d.find_element(By.CSS_SELECTOR, ".card details summary").click()
        assert len(d.find_elements(By.CSS_SELECTOR, ".card details tbody tr")) == len(days)
        assert len({b.get_attribute("x") for b in d.find_elements(By.CSS_SELECTOR, "svg.plot rect")}) == len(days)
        check_page(d)
        d.find_element(By.CSS_SELECTOR, ".card details summary").click()
        screenshot(d, "researcher", site.tmp)


def test_on_a_phone(site):
    """No sideways scrolling at a phone's width; tables become one card per row."""
    set_user(site.issuer, BOB, name="Bob")              # a subdomain of an allowed domain
    with chromium(PHONE) as d:
        sign_in(d, site, BOB)
        d.find_element(By.ID, "alias").send_keys("phone")
        d.find_element(By.CSS_SELECTOR, "#new-key button[type=submit]").click()
        wait(d, lambda: "Your new key" in d.title)
        check_page(d)
        d.get(site.url + "/key/manage")
        check_page(d)
        assert d.execute_script("return getComputedStyle(document.querySelector('table.keys thead')).position")\
            == "absolute"
        screenshot(d, "researcher-phone", site.tmp)


def test_someone_outside_the_allowed_domains_is_refused(site):
    set_user(site.issuer, "eve@example.com", name="Eve")
    with chromium() as d:
        sign_in(d, site, "eve@example.com")
        assert "may not use this service" in text(d) and "@lbl.gov" in text(d)
        d.get(site.url + "/key/manage")
        assert "Sign in with your lab account" in text(d)          # no session was opened
    assert site.keys_of("eve@example.com") == []


def test_a_forged_form_is_refused(site):
    """A form posted without the page's CSRF token makes no key: from the Key Manager's own origin
    (a script the page did not write), and from another site (which the cookie's SameSite also stops)."""
    before = len(site.keys_of(ALICE))
    with chromium() as d:
        sign_in(d, site, ALICE)
        d.execute_script("""
          const f = document.createElement('form');
          f.method = 'post'; f.action = '/key/manage/keys';
          const i = document.createElement('input'); i.name = 'alias'; i.value = 'forged'; f.appendChild(i);
          document.body.appendChild(f); f.submit();""")
        wait(d, lambda: "did not come from your Key Manager page" in text(d))
        forged_elsewhere = (f"<form method=post action='{site.url}/key/manage/keys'>"
                            "<input name=alias value=forged><input name=csrf value=guess></form>")
        d.get(site.issuer + "/")             # another origin
        d.execute_script("document.body.innerHTML = arguments[0]; document.forms[0].submit()", forged_elsewhere)
        wait(d, lambda: "did not come from your Key Manager page" in text(d))
    assert len(site.keys_of(ALICE)) == before


def test_admin_sees_users_sets_a_budget_and_blocks_a_key(site):
    key = site.gw.new_key(ALICE, key_alias="pipeline")
    client = openai.OpenAI(api_key=key, base_url=site.url, max_retries=0)
    client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    with chromium() as d:
        sign_in(d, site, ADMIN)
        d.find_element(By.LINK_TEXT, "Users").click()
        month = f"tr[data-user='{ALICE}'] td[data-label='Last 30 days'] data"
        reload_until(d, d.current_url, lambda: float(d.find_element(By.CSS_SELECTOR, month).get_attribute("value")) > 0)
        check_page(d)
        screenshot(d, "admin-users", site.tmp)

        d.find_element(By.CSS_SELECTOR, f"tr[data-user='{ALICE}'] a").click()
        budget = d.find_element(By.ID, "max_budget")
        budget.send_keys("lots")
        budget.submit()
        wait(d, lambda: "Not saved: max_budget" in text(d))
        budget = d.find_element(By.ID, "max_budget")
        budget.clear()
        budget.send_keys("12.5")
        d.find_element(By.ID, "rpm_limit").send_keys("600")
        budget.submit()
        wait(d, lambda: "Limits of alice@lbl.gov saved" in text(d))
        info = site.gw.admin("GET", f"/user/info?user_id={ALICE}").json()["user_info"]
        assert info["max_budget"] == 12.5 and info["rpm_limit"] == 600
        assert "$12.50" in d.find_element(By.CSS_SELECTOR, ".budget").text
        check_page(d)
        screenshot(d, "admin-user", site.tmp)

        d.find_element(By.LINK_TEXT, "All keys").click()
        q = d.find_element(By.ID, "q")
        q.send_keys("pipe")
        q.submit()
        rows = d.find_elements(By.CSS_SELECTOR, "table.keys tbody tr[data-key-id]")
        assert len(rows) == 1 and "pipeline" in rows[0].text
        rows[0].find_element(By.XPATH, ".//button[text()='Block']").click()
        wait(d, lambda: "blocked" in text(d))
        assert "q=pipe" in d.current_url                          # back on the same search
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert "blocked" in str(e.value)
        d.get(site.url + "/key/manage/admin/keys")
        check_page(d)
        screenshot(d, "admin-keys", site.tmp)


def test_researchers_do_not_see_admin_pages(site):
    with chromium() as d:
        sign_in(d, site, ALICE)
        assert d.find_elements(By.LINK_TEXT, "Users") == []
        d.get(site.url + "/key/manage/admin/keys")
        assert "for the service's administrators" in text(d)


# -- a model swapped on a real CPU node ----------------------------------------------------------
@pytest.mark.engine
def test_admin_swaps_a_model_on_the_cpu_node(tmp_path_factory):
    require_browser()
    from tests.helpers.inference import minilm, node_and_gateway

    tmp = tmp_path_factory.mktemp("km-swap")
    deps = [minilm("embed-a"), minilm("embed-b", autoload=False, embeddings={"truncate": True})]
    with oidc_provider() as issuer, \
            node_and_gateway(tmp, deps, oidc_issuer=issuer, **OIDC) as (node, gw):
        set_user(issuer, ADMIN, name="Ada Admin")
        key = gw.new_key(ALICE)
        site = Site(gw, issuer, tmp)
        with chromium() as d:
            sign_in(d, site, ADMIN)
            d.find_element(By.LINK_TEXT, "Models").click()
            row = d.find_element(By.CSS_SELECTOR, "tr[data-deployment='embed-a']")
            assert "ready" in row.text
            assert "stopped" in d.find_element(By.CSS_SELECTOR, "tr[data-deployment='embed-b']").text
            Select(row.find_element(By.NAME, "to")).select_by_visible_text("embed-b")
            row.find_element(By.XPATH, ".//button[text()='Swap']").click()
            wait(d, lambda: "Swapping lbl/nomic-embed-text to embed-b" in text(d))

            def state(name: str) -> str:
                return d.find_element(By.CSS_SELECTOR, f"tr[data-deployment='{name}'] .badge").text
            wait(d, lambda: state("embed-b") == "ready" and state("embed-a") == "stopped", 240)   # the page follows
            check_page(d)
            screenshot(d, "admin-models", tmp)
        node.wait("embed-b", "ready")
        gw.wait_model("lbl/nomic-embed-text")
        r = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0).embeddings.create(
            model="lbl/nomic-embed-text", input="word " * 400)
        assert r.usage.prompt_tokens == 256          # embed-b truncates where embed-a refused
