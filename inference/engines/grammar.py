"""Grammar-constrained decoding for the transformers engine, on llguidance.

Why llguidance (xgrammar is the other maintained choice; scripts/bench_grammar.py measures both):
its masks cost about the same per token (well under a millisecond, against tens of milliseconds
for a forward pass here), it is one self-contained wheel (xgrammar brings triton and a TVM
runtime into a CPU node), and its Lark grammars embed JSON Schemas (`%json {...}`), which makes
the grammar of `tool_choice: "required"` (a list of calls, each a name and its schema's
arguments) a few lines. Its tokenizer index takes seconds to build for a large vocabulary, so it
is built once, beside the model's loading (`Grammars`).

JSON Schema outputs and tool calls are generated compact, with fixed separators (`", "`, `": "`):
a small model left free to add whitespace may add it forever. For the same reason, an object with
declared properties takes no undeclared ones unless its schema allows them explicitly (vLLM's
default reading, with xgrammar).

JSON mode (`json_object`) is the exception: there the model chooses the whole shape, and SmolLM2,
shown JSON pretty-printed (instructor's prompt quotes its schema with `indent=2`), starts `{` + a
newline; forced compact it is off its own distribution and wanders, inside a key or a string
where it may not stop, until max_tokens. So JSON mode takes whitespace between tokens, bounded
(24 characters a gap: indentation, not an endless run; xgrammar's `any_whitespace`, bounded), and
numbers of bounded length (a number may otherwise go on forever: `36.000000000000000011111...`).
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile; the message says why."""


def _closed(schema):
    """Objects with declared properties take no others unless the schema says so, as vLLM's default
    (xgrammar's strict mode) reads them: a small model otherwise invents keys until max_tokens."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k in _SUBSCHEMAS else v) for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(out.get(k), dict):
            out[k] = {name: _closed(v) for name, v in out[k].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties", "not", "if", "then", "else"}


def _json(schema: dict) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON Schema must be an object")
    return "%json " + json.dumps({**_closed(schema), "x-guidance": _JSON_STYLE})


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)


# `response_format: json_object`: any JSON object; whitespace between tokens up to 24 characters a gap;
# numbers of at most 20 digits before the point, 20 after it and 3 in the exponent (any 64-bit
# integer, any double as Python writes it).
JSON_OBJECT = r"""start: object
value: object | array | STRING | NUMBER | "true" | "false" | "null"
object: "{" WS (pair WS ("," WS pair WS)*)? "}"
pair: STRING WS ":" WS value
array: "[" WS (value WS ("," WS value WS)*)? "]"
WS: /[ \t\r\n]{0,24}/
STRING: /"([^"\\\x00-\x1f]|\\["\\\/bfnrt]|\\u[0-9a-fA-F]{4})*"/
NUMBER: /-?(0|[1-9][0-9]{0,19})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?/
"""


def json_grammar(schema: dict) -> str:
    """Output that is one JSON value valid against `schema`."""
    return "start: " + _json(schema)


def tool_calls_grammar(tools: list[tuple[str, dict]], parallel: bool) -> str:
    """`tool_choice: "required"`: a JSON list of calls `{"name": ..., "parameters": {...}}`, each
    naming one of `tools` with arguments valid against its schema (vLLM's form). One call only
    when `parallel` is false."""
    lines = ['start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"',
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, (name, schema) in enumerate(tools):
        head = '{"name": ' + json.dumps(name) + ', "parameters": '
        lines.append(f"call_{i}: {_lit(head)} args_{i} " + _lit("}"))
        lines.append(f"args_{i}: {_json(schema)}")
    return "\n".join(lines)


def check(grammar: str) -> None:
    """Raise GrammarError when `grammar` does not compile (an unsupported schema keyword, say)."""
    import llguidance
    bad, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if bad:
        first = msgs[0].split("\n")[0]
        raise GrammarError(first.split(": ", 1)[1] if first.startswith("at ") and ": " in first else first)


class Grammars:
    """The tokenizer index llguidance needs, built once in a thread, and matchers over it."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_ids: set[int]):
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-index")
        self._tok: Future = self._pool.submit(self._index, hf_tokenizer, vocab_size, sorted(stop_ids))

    @staticmethod
    def _index(hf_tokenizer, vocab_size: int, stop_ids: list[int]):
        import llguidance.hf
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stop_ids)

    def matcher(self, grammar: str) -> "Constraint":
        return Constraint(self._tok.result(), grammar, self.vocab_size)


class Constraint:
    """One sequence's grammar state: which tokens may come next, and what came."""

    __slots__ = ("_m", "_bits", "_vocab")

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        import llguidance
        self._m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._m.is_error():
            raise GrammarError(self._m.get_error())
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)
        self._vocab = vocab_size

    @property
    def done(self) -> bool:
        """The output is complete: the grammar admits no further token."""
        return self._m.is_stopped()

    def allowed(self) -> np.ndarray:
        """A boolean array over the vocabulary: the tokens the grammar admits next (stop tokens
        among them once the output may end)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._vocab].view(bool)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._m.get_error()}")
