"""A causal language model and its decoding loop, for the transformers engine.

The loop is written out (prefill, then one token at a time with the KV cache) rather than
`model.generate`, because the server needs, per token: the cancel check (client gone), stop
strings checked on the decoded text, a grammar's mask, log probabilities, and exact counts.
Runs in one worker thread; never on the event loop.

Logits are processed as vLLM does: log probabilities are those of the model's own distribution
(before penalties, bias, grammar and temperature); then `logit_bias`, the repetition penalty
(prompt and output tokens), presence and frequency penalties (output tokens), the grammar's
mask, then temperature, top-k, top-p and min-p sampling.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple

if TYPE_CHECKING:
    from .grammar import Constraint, Grammars

log = logging.getLogger("cborg.engine")


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None         # None: none; k: the chosen token's and the k most likely


class Step(NamedTuple):
    token: int
    logprob: float | None = None                     # when Sampling.logprobs is set
    top: list[tuple[int, float]] | None = None       # the most likely tokens, best first


class CausalLM:
    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", chat_template: str | None = None,
                 threads: int | None = None, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if chat_template:
            self.tokenizer.chat_template = chat_template
        td = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=td).to(device)
        self.model.eval()
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.stop_ids = self._stop_ids()
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no logits for the whole prompt
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._grammars: "Grammars | None" = None

    @property
    def grammars(self) -> "Grammars":
        """llguidance's index of this tokenizer, started on first use (the engine starts it at load)."""
        if self._grammars is None:
            from .grammar import Grammars
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids)
        return self._grammars

    def _stop_ids(self) -> set[int]:
        """End of sequence, and the chat template's end of turn (Gemma's <end_of_turn>)."""
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(i for i in src if isinstance(i, int))
        for tok in ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return ids

    # -- prompts -----------------------------------------------------------------------
    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions, or set chat_template "
                             "in its deployment")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- decoding ----------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def tokens(self, ids: list[int], s: Sampling, cancel: threading.Event,
               constraint: "Constraint | None" = None) -> Iterator[Step]:
        """Yield generated tokens: at most s.max_tokens, ending after a stop id, or when the
        constraint's grammar is complete."""
        torch = self.torch
        gen = None
        if s.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "little"))
        ck = self._cache_kw
        proc = _Processors(torch, s, ids, self.vocab_size, self.device)
        with torch.inference_mode():
            inp = torch.tensor([ids], device=self.device)
            out = self.model(input_ids=inp, use_cache=True, **self._keep)
            past = out[ck]
            logits = out.logits[0, -1].float()
            for _ in range(s.max_tokens):
                if cancel.is_set() or (constraint is not None and constraint.done):
                    return
                lps = torch.log_softmax(logits, dim=-1) if s.logprobs is not None else None
                logits = proc(logits)
                if constraint is not None:
                    mask = constraint.allowed()
                    if not mask.any():
                        raise RuntimeError("the grammar admits no token here")
                    allowed = torch.from_numpy(mask).to(self.device)
                    logits = logits.masked_fill(~allowed, float("-inf"))
                tok = self._pick(logits, s, gen)
                if lps is None:
                    yield Step(tok)
                else:
                    top = None
                    if s.logprobs:
                        v, i = torch.topk(lps, s.logprobs)
                        top = list(zip(i.tolist(), v.tolist()))
                    yield Step(tok, float(lps[tok]), top)
                if tok in self.stop_ids:
                    return
                if constraint is not None:
                    constraint.accept(tok)
                proc.seen(tok)
                out = self.model(input_ids=torch.tensor([[tok]], device=self.device), use_cache=True,
                                 **{ck: past}, **self._keep)
                past = out[ck]
                logits = out.logits[0, -1].float()

    def _pick(self, logits, s: Sampling, gen) -> int:
        torch = self.torch
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.min_p > 0:
            probs = probs * (probs >= s.min_p * probs.max())
        if s.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, dim=-1) - sp < s.top_p * sp.sum()   # the smallest set reaching top_p
            sp = sp * keep
            choice = torch.multinomial(sp.cpu() / sp.sum(), 1, generator=gen)
            return int(si[choice.to(si.device)])
        return int(torch.multinomial(probs.cpu() / probs.sum(), 1, generator=gen))


class _Processors:
    """logit_bias and the penalties, applied to one sequence's logits step by step."""

    def __init__(self, torch, s: Sampling, prompt: list[int], vocab: int, device):
        self.torch = torch
        self.s = s
        self.bias = None
        if s.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            for k, v in s.logit_bias.items():
                self.bias[k] = v
        self.counts = torch.zeros(vocab, device=device) if (s.presence_penalty or s.frequency_penalty) else None
        self.present = None
        if s.repetition_penalty != 1.0:
            self.present = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.present[torch.tensor(prompt, device=device)] = True

    def __call__(self, logits):
        s = self.s
        if self.bias is not None:
            logits = logits + self.bias
        if self.present is not None:
            rp = s.repetition_penalty
            logits = self.torch.where(self.present, self.torch.where(logits > 0, logits / rp, logits * rp), logits)
        if self.counts is not None:
            logits = logits - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
        return logits

    def seen(self, tok: int) -> None:
        if self.counts is not None:
            self.counts[tok] += 1
        if self.present is not None:
            self.present[tok] = True
