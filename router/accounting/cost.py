"""Cost of a request from the catalog's prices and the upstream's usage."""
from __future__ import annotations

from ..catalog import ModelConf, Price


def cost_of(price: Price, usage: dict) -> float:
    """US dollars. `prompt_tokens` includes cached and cache-write tokens (OpenAI's convention;
    the Anthropic and Bedrock adapters report theirs the same way)."""
    prompt = usage.get("prompt_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    plain = max(prompt - cached - written, 0)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    write_price = price.cache_write if price.cache_write is not None else price.input
    return (plain * price.input + cached * cached_price + written * write_price
            + completion * price.output) / 1e6


def worst_cost(model: ModelConf, body: dict, prompt_estimate: int) -> float:
    """The most a call can cost, reserved against budgets at admission (router/limits): the prompt
    estimate at the input price and the output limit the caller asked for (max_completion_tokens,
    max_tokens, or the Responses API's max_output_tokens), else the model's, at the output price."""
    price = model.price
    out = 0
    if model.mode == "chat":
        out = model.max_output_tokens
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        if type(asked) is int and 0 < asked < out:
            out = asked
    return (prompt_estimate * price.input + out * price.output) / 1e6


def format_cost(cost: float) -> bytes:
    """The x-litellm-response-cost header value, as LiteLLM writes it (str of a float)."""
    return repr(round(cost, 12)).encode()


_IMAGE_TOKENS = 1_000   # what an inline image counts as: providers charge hundreds to ~1,600 tokens


def estimate_tokens(text: bytes) -> int:
    """About four bytes a token: the usual rule of thumb for English text and JSON. Used for cost
    estimates and for admitting a request against a tokens-per-minute limit before the upstream
    reports the true count (which then replaces the estimate). Inline (base64) images count as
    `_IMAGE_TOKENS` each, not by their size: a photo's megabytes are not a million tokens."""
    n = len(text)
    images = 0
    i = text.find(b";base64,")
    while i != -1:
        end = text.find(b'"', i)
        if end == -1:
            break
        n -= end - i
        images += 1
        i = text.find(b";base64,", end)
    return (n + 3) // 4 + images * _IMAGE_TOKENS
