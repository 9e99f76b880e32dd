"""Cost of grammar-constrained decoding per token: llguidance (what the transformers engine uses)
against xgrammar, side by side in one run, on the CPU profile's tokenizer, with a forward pass of
its model for scale.

For each library: the tokenizer index (built once per engine), then per generated token the mask
(which tokens the grammar admits) and its application to the logits, then the token's acceptance,
over the tokens of valid JSON for a pydantic-style schema. xgrammar is not a dependency:
`pip install --target DIR xgrammar apache-tvm-ffi` and put DIR on PYTHONPATH to include it.

    python scripts/bench_grammar.py [--weights SPEC] [--rounds 20]     (default: the CPU profile's lbl/llama)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "languages": {"type": "array", "items": {"type": "string"}},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city"],
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}}}
TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "languages": ["English", "French", "Italian"],
                   "address": {"city": "London", "zip": "W1"}})


def per_token(run, rounds: int) -> float:
    """Median seconds per token of `run()` (which returns the tokens it handled) over `rounds`."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        n = run()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def bench_llguidance(tok, vocab: int, ids: list[int], logits, rounds: int,
                     grammar: str | None = None) -> tuple[float, float]:
    """grammar: the schema's (default), or another one that `ids` follow."""
    import torch

    from inference.engines.grammar import Constraint, json_grammar
    import llguidance.hf
    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    index = time.perf_counter() - t
    grammar = grammar or json_grammar(SCHEMA)

    def run() -> int:
        c = Constraint(lt, grammar, vocab)
        for i in ids:
            logits.masked_fill(~torch.from_numpy(c.allowed()), float("-inf"))
            c.accept(i)
        return len(ids)

    def mask_only() -> int:
        c = Constraint(lt, grammar, vocab)
        for i in ids:
            c.allowed()
            c.accept(i)
        return len(ids)
    print(f"  (llguidance mask alone: {per_token(mask_only, rounds) * 1000:.3f} ms/token)")
    return index, per_token(run, rounds)


def bench_xgrammar(tok, vocab: int, ids: list[int], logits, rounds: int) -> tuple[float, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    index = time.perf_counter() - t
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    bits = xgr.allocate_token_bitmask(1, vocab)

    def run() -> int:
        m = xgr.GrammarMatcher(compiled)
        for i in ids:
            m.fill_next_token_bitmask(bits)
            xgr.apply_token_bitmask_inplace(logits.view(1, -1), bits)
            assert m.accept_token(i)
        return len(ids)
    return index, per_token(run, rounds)


def cpu_weights() -> str:
    """What models.yaml's cpu profile serves lbl/llama with on the transformers engine."""
    from pathlib import Path

    from inference.config import load_inference
    conf = load_inference(Path(__file__).resolve().parent.parent / "models.yaml", "cpu")
    return next(d.weights for d in conf.profile.deployments
                if d.model == "lbl/llama" and d.engine == "transformers" and d.autoload)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="default: the weights the CPU profile serves lbl/llama with")
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    import torch

    from inference.engines.causal_lm import CausalLM
    from inference.weights import prepare
    weights = a.weights or cpu_weights()
    lm = CausalLM(prepare(weights))
    tok, vocab = lm.tokenizer, lm.vocab_size
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    logits = torch.zeros(vocab)
    with torch.inference_mode():
        past = lm.model(input_ids=torch.tensor([ids[:8]]), use_cache=True)[lm._cache_kw]

        def forward() -> int:
            lm.model(input_ids=torch.tensor([[ids[8]]]), use_cache=True, **{lm._cache_kw: past}, **lm._keep)
            return 1
        fwd = per_token(forward, a.rounds * 5)
    print(f"weights {weights}: vocabulary {vocab}, {len(ids)} JSON tokens, median of {a.rounds} rounds")
    print(f"  forward pass (one token, KV cache):          {fwd * 1000:8.2f} ms/token")
    for name, r in (("llguidance", bench_llguidance(tok, vocab, ids, logits, a.rounds)),
                    ("xgrammar", bench_xgrammar(tok, vocab, ids, logits, a.rounds))):
        if r is None:
            print(f"  {name:11s} not installed")
            continue
        index, tok_s = r
        print(f"  {name:11s} index {index:6.2f} s   mask + apply + accept {tok_s * 1000:6.3f} ms/token "
              f"= {tok_s / fwd:6.1%} of a forward pass")
    # JSON mode (json_object): the engine's own grammar, over the same object pretty-printed
    from inference.engines.grammar import JSON_OBJECT
    pretty = tok(json.dumps(json.loads(TEXT), indent=2), add_special_tokens=False)["input_ids"]
    _, tok_s = bench_llguidance(tok, vocab, pretty, logits, a.rounds, JSON_OBJECT)
    print(f"  llguidance, JSON mode ({len(pretty)} tokens)   mask + apply + accept {tok_s * 1000:6.3f} ms/token "
          f"= {tok_s / fwd:6.1%} of a forward pass")


if __name__ == "__main__":
    main()
