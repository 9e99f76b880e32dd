"""Log probabilities in OpenAI's two shapes: chat's `logprobs.content` list and the legacy
completions' parallel arrays. Token texts are each token decoded alone, as vLLM gives them."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .causal_lm import CausalLM, Step
    from .params import Plan


def _entry(lm: "CausalLM", token: int, lp: float) -> dict:
    t = lm.token_text(token)
    return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}


def chat(lm: "CausalLM", steps: list["Step"]) -> dict:
    return {"content": [{**_entry(lm, s.token, s.logprob),
                         "top_logprobs": [_entry(lm, t, lp) for t, lp in s.top or ()]} for s in steps]}


def completion(lm: "CausalLM", steps: list["Step"], p: "Plan", offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for s in steps:
        t = lm.token_text(s.token)
        tokens.append(t)
        lps.append(s.logprob)
        top = {lm.token_text(k): lp for k, lp in s.top or ()}
        top.setdefault(t, s.logprob)             # the sampled token too, as vLLM gives it
        tops.append(top)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
