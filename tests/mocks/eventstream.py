"""Encoder of the AWS binary event-stream format, for the Bedrock mock.

botocore ships only the decoder (botocore.eventstream), which the gateway uses; the mock needs the
other direction. Format: total length (u32), headers length (u32), prelude CRC32, headers
(name length u8, name, type 7 = string, value length u16, value), payload, message CRC32.
The gateway's side decodes with botocore, which checks both CRCs, so a mistake here fails tests.
"""
from __future__ import annotations

import struct
from binascii import crc32


def _headers(headers: dict[str, str]) -> bytes:
    out = b""
    for name, value in headers.items():
        n = name.encode()
        v = value.encode()
        out += struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v
    return out


def encode(headers: dict[str, str], payload: bytes) -> bytes:
    h = _headers(headers)
    total = 12 + len(h) + len(payload) + 4
    prelude = struct.pack(">II", total, len(h))
    prelude += struct.pack(">I", crc32(prelude) & 0xFFFFFFFF)
    body = prelude + h + payload
    return body + struct.pack(">I", crc32(body) & 0xFFFFFFFF)


def event(event_type: str, payload: bytes) -> bytes:
    return encode({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                  payload)


def exception(exception_type: str, payload: bytes) -> bytes:
    return encode({":exception-type": exception_type, ":content-type": "application/json",
                   ":message-type": "exception"}, payload)
