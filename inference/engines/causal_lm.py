"""A causal language model and its decoding loop, for the transformers engine.

The loop is written out (prefill, then one token at a time with the KV cache) rather than
`model.generate`, because the server needs, per token: the cancel check (client gone), stop
strings checked on the decoded text, and exact counts. Runs in one worker thread; never on the
event loop.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("cborg.engine")


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


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
    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions, or set chat_template "
                             "in its deployment")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- decoding ----------------------------------------------------------------------
    def tokens(self, ids: list[int], s: Sampling, cancel: threading.Event) -> Iterator[int]:
        """Yield generated token ids: at most s.max_tokens, ending after a stop id."""
        torch = self.torch
        gen = None
        if s.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "little"))
        ck = self._cache_kw
        with torch.inference_mode():
            inp = torch.tensor([ids], device=self.device)
            out = self.model(input_ids=inp, use_cache=True, **self._keep)
            past = out[ck]
            logits = out.logits[0, -1]
            for _ in range(s.max_tokens):
                if cancel.is_set():
                    return
                tok = self._pick(logits, s, gen)
                yield tok
                if tok in self.stop_ids:
                    return
                out = self.model(input_ids=torch.tensor([[tok]], device=self.device), use_cache=True,
                                 **{ck: past}, **self._keep)
                past = out[ck]
                logits = out.logits[0, -1]

    def _pick(self, logits, s: Sampling, gen) -> int:
        torch = self.torch
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, dim=-1) - sp < s.top_p   # the smallest set reaching top_p
            sp = sp * keep
            choice = torch.multinomial(sp.cpu() / sp.sum(), 1, generator=gen)
            return int(si[choice.to(si.device)])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))
