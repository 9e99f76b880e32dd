"""lbl/qwen-vision (a vLLM engine in the lab) is sent images inline only: an http(s) image URL is
refused at the gateway, as for Gemini and Bedrock, instead of being fetched by the engine from inside
the lab (issue 14 item 7). Before: the URL was passed to the engine."""
from __future__ import annotations

import httpx
import pytest

PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
       "RU5ErkJggg==")


def image_msg(url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("model", ["lbl/qwen-vision", "lbl/cborg-vision"])
@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "https://intranet.lbl.gov/x.png",
                                 "file:///etc/passwd"])
def test_image_urls_are_refused_for_local_models(gateway, api_key, fresh_mock, model, url):
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                   json={"model": model, "messages": image_msg(url)}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "data: URL" in err["message"]
    assert err["param"] == ("messages[1].content[1]" if model == "lbl/cborg-vision" else "messages[0].content[1]")
    assert not fresh_mock.requests


def test_anthropic_url_image_is_refused_too(gateway, api_key, fresh_mock):
    r = httpx.post(gateway.url + "/v1/messages", headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
                   json={"model": "lbl/qwen-vision", "max_tokens": 10, "messages": [{"role": "user", "content": [
                       {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/a.png"}}]}]}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert not fresh_mock.requests


def test_inline_images_still_pass(gateway, api_key, fresh_mock):
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                   json={"model": "lbl/qwen-vision", "messages": image_msg(PNG)}, timeout=30)
    assert r.status_code == 200, r.text
