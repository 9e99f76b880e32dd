"""Tool calls in a model's own words, for `tool_choice: "auto"` (the model answers in text or calls tools).

A model trained for tools writes its calls in a form of its own, which its chat template teaches;
the deployment names the parser that reads it (models.yaml: `transformers.tool_call_parser`, with
vLLM's names for the same forms). A model without one keeps the clear 400 of params.py.

`xlam`: SmolLM2 and Salesforce's xLAM write `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`
(a single object is read as one call; "parameters" as "arguments").

The parser reads the output as it is generated and returns the stream's deltas in OpenAI's shape:
text outside a call block as content (a possible start of `<tool_call>` held back until it is known
not to be one), and each call whole (id, type, name and arguments in one delta) when its block
closes, or at the end when the model stops without closing it. A block that does not read as calls
is content after all: no text is lost. The whole answer is the same parser fed everything at once.
"""
from __future__ import annotations

import json

from .tool_calls import call_id


def _held(text: str, tag: str) -> int:
    """How many trailing characters of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _calls(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments as JSON text) for each call in a block, or None when it is not calls."""
    try:
        v = json.loads(text)
    except ValueError:
        return None
    items = [v] if isinstance(v, dict) else v
    if not isinstance(items, list):
        return None
    out = []
    for c in items:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):            # arguments already as JSON text (OpenAI's own shape)
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        out.append((c["name"], json.dumps(args, ensure_ascii=False)))
    return out


class XLAMParser:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.content = ""                    # the content released so far
        self.calls: list[dict] = []          # the message's tool_calls so far
        self._buf = ""
        self._inside = False                 # _buf starts with OPEN

    def feed(self, text: str) -> list[dict]:
        """The deltas (`{"content": ...}` or `{"tool_calls": [...]}`) that `text`, the next piece of
        output, completes."""
        out: list[dict] = []
        self._buf += text
        while True:
            if not self._inside:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    keep = _held(self._buf, self.OPEN)
                    self._say(out, self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._say(out, self._buf[:i])
                self._buf = self._buf[i:]
                self._inside = True
            j = self._buf.find(self.CLOSE, len(self.OPEN))
            if j < 0:
                return out
            end = j + len(self.CLOSE)
            block, self._buf = self._buf[:end], self._buf[end:]
            self._inside = False
            self._block(out, block, block[len(self.OPEN):j])

    def end(self) -> list[dict]:
        """At the end of the output: what was held back (an unclosed block's calls, or its text)."""
        out: list[dict] = []
        block, self._buf = self._buf, ""
        if self._inside:
            self._inside = False
            self._block(out, block, block[len(self.OPEN):])
        else:
            self._say(out, block)
        return out

    def _block(self, out: list[dict], block: str, inner: str) -> None:
        calls = _calls(inner)
        if calls is None:
            self._say(out, block)
            return
        for name, args in calls:             # `[]`: the model's way of calling none
            call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}
            self.calls.append(call)
            out.append({"tool_calls": [{"index": len(self.calls) - 1, **call}]})

    def _say(self, out: list[dict], text: str) -> None:
        if text:
            self.content += text
            out.append({"content": text})


PARSERS = {"xlam": XLAMParser}
