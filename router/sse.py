"""Incremental server-sent-events framing.

Why our own: the gateway forwards upstream events byte for byte and only needs to find event
boundaries and read `event:`/`data:` fields; the SSE libraries for Python (httpx-sse,
sseclient) are bound to one HTTP client's response object. This follows the WHATWG framing:
events end at a blank line, lines end at LF, CRLF or CR; comment lines start with ':'.
"""
from __future__ import annotations


class SSESplitter:
    """Feed bytes as they arrive; get back complete raw events (without the blank line)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # A trailing CR may be the first half of a CRLF: it stays in the buffer, unconverted.
            hold = buf.endswith(b"\r")
            buf = buf[:-1] if hold else buf
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if hold else b"")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    def flush(self) -> list[bytes]:
        """What is left when the stream ends (an event without its final blank line)."""
        rest = self._buf.replace(b"\r", b"").strip(b"\n")
        self._buf = b""
        return [rest] if rest else []


def parse_event(raw: bytes) -> tuple[str, bytes]:
    """(event name, data) of one raw event; the name is "message" when absent.

    Several data lines are joined with LF, as the spec says.
    """
    name = "message"
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line or line[0] == 58:  # ':' comment
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return name, b"\n".join(data)


def data_event(payload: bytes) -> bytes:
    """One `data:` event, framed for sending."""
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"
