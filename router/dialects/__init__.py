"""Inbound API shapes other than OpenAI chat (the gateway's internal form), one module of pure functions each:

- `anthropic_messages`: Anthropic Messages (`POST /v1/messages`, what Claude Code and the anthropic SDK send);
- `openai_responses`: OpenAI Responses (`POST /v1/responses`, what Codex and `client.responses` send).

Each converts a request to the internal chat form for the outbound providers (router/providers/), and the
chat completion or chat chunk stream that comes back into its own response or events. When the model's
provider speaks the dialect itself (anthropic/* on /v1/messages, openai/* on /v1/responses) the request
is passed through untouched instead (router/agents.py decides); the dialect then only reads the usage.
A field a new agent release adds is handled here, in one place: translated, or dropped with a debug log.
"""
from __future__ import annotations

import orjson

from ..sse import SSESplitter


def count(v) -> int:
    """A token count to show a client: the final usage reaches a dialect already checked (accounting's
    `valid_usage`, what is billed); this guards what may come before it (message_start's input count) or
    around it, so that an upstream's odd number is a 0, never a crash mid-stream."""
    return v if type(v) is int and v >= 0 else 0


def _details(u: dict, name: str) -> dict:
    d = u.get(name)
    return d if type(d) is dict else {}


class ChunkEvents:
    """Base of a dialect's stream over a provider's chat-chunk translator: the pipeline reads the inner
    translator's usage and error; each OpenAI chunk (or error event) goes to `_chunk` (or `fail`)."""

    __slots__ = ("inner",)

    @property
    def usage(self):
        return self.inner.usage

    @property
    def error(self):
        return self.inner.error

    def _on(self, obj: dict, out: list[bytes]) -> None:
        err = obj.get("error")
        if err is not None:
            out.append(self.fail((err.get("message") if type(err) is dict else str(err)) or "upstream error"))
        else:
            self._chunk(obj, out)

    def _convert(self, events: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for ev in events:
            payload = ev[6:].rstrip(b"\n") if ev[:6] == b"data: " else b""
            if payload:
                self._on(orjson.loads(payload), out)
        return out

    def feed(self, data: bytes) -> list[bytes]:
        return self._convert(self.inner.feed(data))

    def close(self) -> list[bytes]:
        return self._convert(self.inner.close())


class NativeRelay:
    """Base of a pass-through stream: events relayed byte for byte (framing normalized), `_events` reading
    the usage on the way; nothing to add at the end."""

    __slots__ = ("_sse", "usage", "error")

    def __init__(self) -> None:
        self._sse = SSESplitter()
        self.usage: dict | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        return self._events(self._sse.feed(data))

    def close(self) -> list[bytes]:
        return self._events(self._sse.flush())

    def end(self, usage: dict | None) -> bytes:
        return b""
