"""Fixtures for the commercial providers: the Anthropic, Gemini and Bedrock mocks on loopback, and a
gateway whose every provider (OpenAI and xAI through the OpenAI mock) points at them."""
from __future__ import annotations

import os

import pytest
import yaml

from tests.conftest import provider_env, running_gateway
from tests.helpers.servers import ROOT, AiohttpServer
from tests.mocks.anthropic_mock import MockAnthropic
from tests.mocks.bedrock_mock import MockBedrock
from tests.mocks.gemini_mock import MockGemini

# botocore's default credential chain must never reach for an instance-metadata address from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def commercial_models() -> list[dict]:
    """Every model of the repository's catalog whose provider is commercial."""
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    commercial = {n for n, p in conf["providers"].items() if p.get("commercial", True)}
    return [m for m in conf["models"] if m["provider"] in commercial]


class Mocks:
    def __init__(self, openai, anthropic: MockAnthropic, gemini: MockGemini, bedrock: MockBedrock):
        self.openai = openai
        self.anthropic = anthropic
        self.gemini = gemini
        self.bedrock = bedrock

    def by_provider(self, provider: str):
        return {"openai": self.openai, "xai": self.openai, "anthropic": self.anthropic, "google": self.gemini,
                "aws": self.bedrock}[provider]

    def reset(self) -> None:
        for m in (self.openai, self.anthropic, self.gemini, self.bedrock):
            m.reset()

    def env(self) -> dict[str, str]:
        return {**provider_env(self.openai),
                "ANTHROPIC_API_KEY": self.anthropic.api_key, "ANTHROPIC_BASE_URL": self.anthropic.url,
                "GEMINI_API_KEY": self.gemini.api_key, "GEMINI_BASE_URL": self.gemini.url,
                "AWS_ACCESS_KEY_ID": self.bedrock.access_key, "AWS_SECRET_ACCESS_KEY": self.bedrock.secret_key,
                "AWS_REGION": self.bedrock.region, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.bedrock.url}


@pytest.fixture(scope="session")
def mocks(mock_openai):
    a, g, b = MockAnthropic(), MockGemini(), MockBedrock()
    with AiohttpServer(a.app) as sa, AiohttpServer(g.app) as sg, AiohttpServer(b.app) as sb:
        a.url, g.url, b.url = sa.url, sg.url, sb.url
        yield Mocks(mock_openai, a, g, b)


@pytest.fixture
def fresh(mocks):
    mocks.reset()
    yield mocks
    mocks.reset()


def fast_retries(conf: dict) -> None:
    """Quick retries, so that retry tests take milliseconds."""
    for p in conf["providers"].values():
        p.setdefault("retry", {}).update({"backoff": 0.01, "max_backoff": 0.05})


@pytest.fixture(scope="session")
def cgw(mocks, tmp_path_factory):
    """A gateway with credentials for every commercial provider, all pointed at the mocks."""
    with running_gateway(tmp_path_factory.mktemp("cgw"), mocks.openai, edit=fast_retries, env=mocks.env()) as g:
        yield g


@pytest.fixture(scope="session")
def ckey(cgw):
    return cgw.new_key("providers@lbl.gov")
