"""A small HTTP GET for the node's checks of its own engines (health, load): no client library
needed in the node, which never loads torch or the gateway."""
from __future__ import annotations

import asyncio


async def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None,
                   timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body). Raises OSError or asyncio.TimeoutError when the server does not answer."""
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *hdrs = head.split(b"\r\n")
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise OSError(f"not an HTTP response from {host}:{port}")
        if any(h.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for h in hdrs):
            body = _dechunk(body)
        return int(parts[1]), body

    return await asyncio.wait_for(go(), timeout)


def _dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        size = int(data[i:j].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[j + 2:j + 2 + size])
        i = j + 2 + size + 2
    return b"".join(out)
