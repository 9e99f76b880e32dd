"""Bedrock credentials from botocore's default chain (a profile with credential_process), refreshed off
the event loop, against the SigV4-checking mock."""
from __future__ import annotations

import sys

import openai

from tests.conftest import running_gateway


def test_default_chain_profile_with_refreshing_credentials(mocks, tmp_path, monkeypatch, fresh):
    counter = tmp_path / "runs"
    script = tmp_path / "creds.py"
    # Credentials that expire in 10 minutes: inside botocore's advisory refresh window, so every
    # request refreshes them (in a thread) by running the process again.
    script.write_text(f"""import datetime, json, pathlib
p = pathlib.Path({str(counter)!r}); p.write_text(str(int(p.read_text() if p.exists() else 0) + 1))
exp = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({{"Version": 1, "AccessKeyId": {mocks.bedrock.access_key!r},
                  "SecretAccessKey": {mocks.bedrock.secret_key!r}, "Expiration": exp}}))
""")
    config = tmp_path / "config"
    config.write_text(f"[profile cborg-test]\ncredential_process = {sys.executable} {script}\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = {k: v for k, v in mocks.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_PROFILE"] = "cborg-test"
    with running_gateway(tmp_path / "gw", mocks.openai, env=env) as gw:
        c = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url, max_retries=0)
        for i in range(3):
            r = c.chat.completions.create(model="aws/command-r-v1", messages=[{"role": "user", "content": f"n{i}"}])
            assert r.choices[0].message.content == f"echo: n{i}"
    assert len(fresh.bedrock.requests) == 3
    assert int(counter.read_text()) >= 3        # resolved, then refreshed for the later requests
