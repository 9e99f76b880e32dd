"""Embedding inputs given as token arrays, for upstreams that take text only.

OpenAI's SDKs and LangChain's `OpenAIEmbeddings` (by default) send lists of cl100k token ids
rather than text. An upstream that is not OpenAI's API (a CBorg engine, vLLM, ...) would read
them as its own model's tokens, or refuse them; so, as LiteLLM does for non-OpenAI embedding
models, the gateway decodes them to text with OpenAI's cl100k encoding (from `bpe-openai`, which
ships the encoding's data: nothing is downloaded). One array becomes one string, a list of arrays
a list of strings, so the engine reads the input's shape as it would read text (a single string:
a query; a list: documents).
"""
from __future__ import annotations

from functools import lru_cache

from .base import bad_request

_MAX_ID = 100255          # cl100k's highest ordinary token; special tokens are not text


@lru_cache(maxsize=1)
def _cl100k():
    import bpe_openai
    return bpe_openai.get_encoding("cl100k_base")


def warm() -> None:
    """Load the encoding (seconds); the gateway calls it in a thread at start-up."""
    _cl100k()


def is_token_input(inp) -> bool:
    """Cheap: looks at the first element only (the hot path calls this on every embedding request)."""
    return type(inp) is list and bool(inp) and type(inp[0]) is not str


def _text(ids, where: str) -> str:
    if type(ids) is not list or not ids or not all(type(t) is int and 0 <= t <= _MAX_ID for t in ids):
        raise bad_request(f"{where} must be a non-empty list of cl100k token ids (0 to {_MAX_ID}), or text.", "input")
    return _cl100k().decode(ids)


def decode(inp: list) -> str | list[str]:
    """One token array -> one string; a list of token arrays -> a list of strings."""
    if type(inp[0]) is int:
        return _text(inp, "input")
    return [_text(x, f"input[{i}]") for i, x in enumerate(inp)]
