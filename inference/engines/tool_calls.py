"""Tool calls out of constrained output, piece by piece, in OpenAI's shapes.

The grammar (grammar.py) fixes the text exactly: a named tool_choice generates the arguments
alone; `required` generates `[{"name": "f", "parameters": {...}}, ...]` with fixed separators.
`ToolCalls.feed` reads that text as it is generated and returns the stream's deltas (the first
one of each call with its id, type and name and empty arguments, then argument pieces), the
shape OpenAI streams; `calls` is the message's `tool_calls` at the end. Streamed and whole
answers are built by the same reader, so they agree.
"""
from __future__ import annotations

import json
import uuid

_HEAD = '{"name": '
_PARAMS = ', "parameters": '


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCalls:
    def __init__(self, name: str | None = None):
        """name: the function of a named tool_choice (the text is its arguments); None: a list of calls."""
        self.calls: list[dict] = []
        self._buf = ""
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._named = name is not None
        self._args = self._named          # inside a call's arguments
        self._pending = [self._start(name)] if name is not None else []

    def _start(self, name: str) -> dict:
        call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                "function": {"name": name, "arguments": ""}}

    def feed(self, text: str) -> list[dict]:
        """The tool-call deltas that `text` (the next piece of output) completes."""
        out, self._pending = self._pending, []
        self._buf += text
        while self._buf:
            if self._args:
                if not self._scan_args(out):
                    break
            elif not self._scan_head(out):
                break
        return out

    def _scan_head(self, out: list[dict]) -> bool:
        """Between calls: skip `[` / `, ` / `]` / `}` up to a call's head, then read its name."""
        b = self._buf.lstrip("[], }")
        self._buf = b
        if not b.startswith(_HEAD):
            return False            # incomplete (or the end of the list)
        try:
            name, end = json.JSONDecoder().raw_decode(b, len(_HEAD))
        except ValueError:
            return False            # the name is still coming
        if not b.startswith(_PARAMS, end):
            return False
        self._buf = b[end + len(_PARAMS):]
        out.append(self._start(name))
        self._args = True
        self._depth = 0
        return True

    def _scan_args(self, out: list[dict]) -> bool:
        """Pass argument text on until the arguments' object closes (named tool: all of it)."""
        b = self._buf
        end = len(b)
        closed = False
        for i, ch in enumerate(b):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end, closed = i + 1, True
                    break
        piece, self._buf = b[:end], b[end:]
        if piece:
            self.calls[-1]["function"]["arguments"] += piece
            out.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
        if closed and not self._named:
            self._args = False
            return bool(self._buf)
        return False
