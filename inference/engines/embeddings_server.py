"""The embeddings engine: OpenAI /v1/embeddings for a sentence-transformers model, dynamically batched.

Input shapes follow the OpenAI API: a string, or a list of strings (token arrays are refused
with a 400). The shape also says what the text is, as the CBorg docs require for
lbl/nomic-embed-text: a single string is a search query (`query_prefix` goes before it), a
list holds documents (`document_prefix` before each). `dimensions` truncates a Matryoshka
model's vector and re-normalizes it; other models refuse it, except their own size, which every
model takes as OpenAI's do (normalized, like a truncated vector). An input longer than the
model's limit is a 400 naming the limit, unless the deployment truncates. `encoding_format`
base64 is the little-endian float32 bytes, which the openai SDK asks for by default and decodes.

    python -m inference.engines.embeddings_server --spec FILE    (the node starts it)
"""
from __future__ import annotations

import base64
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import orjson

from common.asgi import HTTPError, Request, Response

from .batcher import DynamicBatcher, QueueFull
from .server import KeyCheck, Spec, base_app, now, serve

log = logging.getLogger("cborg.engine")


class InputTooLong(Exception):
    def __init__(self, index: int, tokens: int):
        self.index = index
        self.tokens = tokens


class EmbeddingModel:
    """The model, and one batch's work: count tokens, check the limit, encode."""

    def __init__(self, path: str, device: str, trust_remote_code: bool, max_batch: int, truncate: bool,
                 threads: int | None):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
        self.tokenizer = self.model.tokenizer
        self.limit = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.max_batch = max_batch
        self.truncate = truncate
        self.forward_passes = 0

    def run(self, batch: list[Sequence[str]]) -> list[Any]:
        """Per request: (vectors, token count) or InputTooLong."""
        flat = [t for texts in batch for t in texts]
        lengths = [len(x) for x in self.tokenizer(flat, add_special_tokens=True, truncation=False)["input_ids"]]
        out: list[Any] = []
        keep: list[str] = []
        spans = []
        i = 0
        for texts in batch:
            ls = lengths[i:i + len(texts)]
            over = [j for j, n in enumerate(ls) if n > self.limit]
            if over and not self.truncate:
                out.append(InputTooLong(over[0], ls[over[0]]))
                spans.append(None)
            else:
                spans.append((len(keep), len(keep) + len(texts)))
                keep.extend(texts)
                out.append(sum(min(n, self.limit) for n in ls))
            i += len(texts)
        if keep:
            vecs = self.model.encode(keep, batch_size=self.max_batch, convert_to_numpy=True,
                                     show_progress_bar=False)
            self.forward_passes += math.ceil(len(keep) / self.max_batch)
            for k, span in enumerate(spans):
                if span is not None:
                    out[k] = (vecs[span[0]:span[1]], out[k])
        return out


class EmbeddingsEngine:
    def __init__(self, spec: Spec):
        dep = spec.deployment
        c = dep.embeddings
        self.conf = c
        self.name = dep.served_name
        self.public = dep.model
        self.model = EmbeddingModel(spec.weights, c.device, c.trust_remote_code, c.max_batch, c.truncate, c.threads)
        self.batcher = DynamicBatcher(self.model.run, c.max_batch, c.max_wait_ms, c.max_queue)
        self.stats: dict[str, Any] = {"deployment": dep.name, "requests": 0, "texts": 0, "forward_passes": 0,
                                      "batches": 0, "running": 0, "queued": 0, "dimensions": self.model.dim,
                                      "max_tokens": self.model.limit}

    def refresh_stats(self) -> dict:
        b = self.batcher
        self.stats.update(forward_passes=self.model.forward_passes, batches=b.batches, running=b.running,
                          queued=b.waiting)
        return self.stats

    def texts(self, body: dict) -> list[str]:
        inp = body.get("input")
        c = self.conf
        if isinstance(inp, str):
            texts = [c.query_prefix + inp] if c.query_prefix else [inp]
            if not inp:
                raise HTTPError(400, "'input' must not be an empty string.", param="input")
            return texts
        if isinstance(inp, list) and inp:
            if all(isinstance(x, str) for x in inp):
                for i, x in enumerate(inp):
                    if not x:
                        raise HTTPError(400, f"input[{i}] must not be an empty string.", param="input")
                return [c.document_prefix + x for x in inp] if c.document_prefix else list(inp)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in inp) or \
                    all(isinstance(x, list) for x in inp):
                raise HTTPError(400, f"Token arrays are not supported as input to '{self.public}': send the text "
                                     "as a string or a list of strings.", param="input", code="invalid_input")
        raise HTTPError(400, "'input' must be a string or a non-empty list of strings.", param="input")

    def dimensions(self, body: dict) -> int | None:
        """The size to cut vectors to and re-normalize; None: as the model gives them."""
        d = body.get("dimensions")
        if d is None:
            return None
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise HTTPError(400, "'dimensions' must be a positive integer.", param="dimensions")
        full = self.model.dim
        if d == full:
            return d
        lo = self.conf.matryoshka_min_dimensions
        if lo is None:
            raise HTTPError(400, f"The model '{self.public}' ({self.name}) has fixed {full}-dimensional embeddings: "
                                 "it does not support 'dimensions'.", param="dimensions")
        if not lo <= d <= full:
            raise HTTPError(400, f"'dimensions' must be between {lo} and {full} for '{self.public}'.",
                            param="dimensions")
        return d

    async def embed(self, body: dict) -> Response:
        texts = self.texts(body)
        dims = self.dimensions(body)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise HTTPError(400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        try:
            r = await self.batcher.submit(texts)
        except QueueFull as e:
            raise HTTPError(503, f"The engine serving '{self.public}' is busy: {e}. Try again shortly.",
                            code="engine_busy", type="service_unavailable",
                            headers=[(b"retry-after", b"1")]) from None
        except InputTooLong as e:
            where = "input" if isinstance(body.get("input"), str) else f"input[{e.index}]"
            raise HTTPError(400, f"{where} is {e.tokens} tokens long (prefix included); '{self.public}' takes at "
                                 f"most {self.model.limit} tokens per input.", param="input",
                            code="context_length_exceeded") from None
        vecs, tokens = r
        if dims is not None:
            vecs = shorten(vecs, dims, self.conf.matryoshka_layer_norm)
        vecs = np.ascontiguousarray(vecs, dtype="<f4")
        if fmt == "base64":
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
                    for i, v in enumerate(vecs)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
        out = {"object": "list", "data": data, "model": self.name,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY))


def shorten(vecs: np.ndarray, dims: int, layer_norm: bool = False) -> np.ndarray:
    """Matryoshka truncation: the first `dims` components, re-normalized to unit length. Some models
    want a layer norm over the whole vector first (nomic-embed-text v1.5: layer_norm, slice,
    normalize); cutting without it gives them worse short vectors."""
    if layer_norm and dims < vecs.shape[1]:
        mu = vecs.mean(axis=1, keepdims=True)
        vecs = (vecs - mu) / np.sqrt(vecs.var(axis=1, keepdims=True) + 1e-5)
    vecs = vecs[:, :dims]
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def build_app(spec: Spec):
    engine = EmbeddingsEngine(spec)
    check = KeyCheck(os.environ.get("CBORG_ENGINE_KEY"))
    app = base_app(check, engine.refresh_stats)
    app.state = engine  # type: ignore[attr-defined]

    async def startup() -> None:
        engine.batcher.start()

    async def shutdown() -> None:
        await engine.batcher.stop()

    app.on_startup = startup
    app.on_shutdown = shutdown

    async def embeddings(req: Request):
        check(req)
        return await engine.embed(await req.json_object())

    async def models(req: Request):
        check(req)
        return Response(orjson.dumps({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": now(), "owned_by": "cborg"}]}))

    app.route("/embeddings", "POST", embeddings)
    app.route("/models", "GET", models)
    return app


def main() -> None:
    spec = Spec.from_args()
    serve(build_app(spec), spec)


if __name__ == "__main__":
    main()
