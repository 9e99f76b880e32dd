"""The inference side of models.yaml: profiles, their nodes and deployments, validated with pydantic.

A profile is one way of running the lab's models: `cpu` (a laptop or CI machine, small stand-in
models) or `gpu` (the 8-GPU servers, the real models). It lists the nodes (each a `cborg node`
process on one server), the deployments (which engine serves which public model, with which
weights, on which node and GPUs), and the models it does not serve with the reason. The gateway
reads the same profile for the node addresses and those reasons (router/nodes.py).

Errors name the bad field the way the file spells it: `profiles.gpu.deployments[2] (coder).gpus: ...`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.paths import chosen_profile
from common.validation import ConfigError, format_validation, read_yaml_mapping

from .weights import WheelSource

Engine = Literal["vllm", "transformers", "embeddings"]
TEMPLATES = Path(__file__).resolve().parent / "templates"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class GPUConf(_Strict):
    index: int = Field(ge=0)
    memory_gib: float = Field(gt=0)


class NodeConf(_Strict):
    name: str
    url: str                                   # how gateways reach the node's admin API
    host: str | None = None                    # where the admin API listens (default: the url's host)
    port: int | None = None                    # (default: the url's port)
    engine_host: str = "127.0.0.1"             # where engines listen: loopback, or a private address gateways reach
    token_env: str = "CBORG_NODE_TOKEN"        # the variable holding the node token (gateway and node)
    gpus: Literal["auto"] | list[GPUConf] = "auto"   # auto: read nvidia-smi; [] for none
    log_dir: str | None = None                 # engine logs (default $CBORG_HOME/logs/NODE)
    drain_timeout_s: float = Field(120.0, ge=0)   # longest wait for in-flight requests on unload/swap
    # Time for every gateway to stop sending new requests before an unload waits out the in-flight
    # ones: gateways poll every 2 s (CBORG_NODE_POLL_S), so a replica that polled just before the
    # drain began learns of it about 2 s later, plus its poll's own time; 5 s leaves a margin for a
    # slow poll. Raise it with the poll interval.
    drain_grace_s: float = Field(5.0, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. http://gpu01.internal:8101")
        return v.rstrip("/")


class RestartConf(_Strict):
    max_restarts: int = Field(5, ge=0)         # crashes in a row (without a ready minute between) before 'failed'
    backoff_s: float = Field(1.0, ge=0)        # first wait; doubles per crash
    max_backoff_s: float = Field(60.0, ge=0)


class VLLMConf(_Strict):
    command: list[str] = ["vllm", "serve"]     # or [".../venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    tensor_parallel_size: int | None = Field(None, ge=1)   # default: the number of GPUs given
    enable_prefix_caching: bool = True
    dtype: str | None = None
    quantization: str | None = None
    tool_call_parser: str | None = None        # also turns on --enable-auto-tool-choice
    limit_mm_per_prompt: dict[str, int] | None = None   # e.g. {image: 4}
    trust_remote_code: bool = False
    extra_args: list[str] = []


class SamplingDefaults(_Strict):
    """Sampling for requests that name none (vLLM's generation config, `--override-generation-config`):
    a small model sampled at temperature 1 wanders, and inside a constrained JSON string, where it may
    not stop, it wanders until max_tokens. Unset: OpenAI's defaults (temperature 1, top_p 1)."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)


class TransformersConf(_Strict):
    device: str = "cpu"                        # cpu, or cuda (the deployment's one GPU)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    default_max_tokens: int = Field(256, ge=1) # when a request names none
    generation_config: SamplingDefaults = SamplingDefaults()   # e.g. the model card's {temperature: 0.2, top_p: 0.9}
    tool_call_parser: str | None = None        # the model was trained for tools: tool_choice "auto" (vLLM's names)
    max_queue: int = Field(16, ge=0)           # waiting requests beyond the running one; more -> 503
    threads: int | None = Field(None, ge=1)    # torch threads (default: torch's)

    @field_validator("tool_call_parser")
    @classmethod
    def _parser(cls, v: str | None) -> str | None:
        from .engines.tool_parsers import PARSERS
        if v is not None and v not in PARSERS:
            raise ValueError(f"unknown tool_call_parser {v!r}: this engine has {', '.join(sorted(PARSERS))}")
        return v


class EmbeddingsConf(_Strict):
    device: str = "cpu"
    max_batch: int = Field(64, ge=1)           # texts per forward pass
    max_wait_ms: float = Field(5.0, ge=0)      # how long the first request of a batch waits for company
    max_queue: int = Field(4096, ge=1)         # texts waiting; more -> 503
    query_prefix: str = ""                     # put before a single-string input (a search query)
    document_prefix: str = ""                  # put before each string of a list input (documents)
    matryoshka_min_dimensions: int | None = Field(None, ge=1)   # `dimensions` allowed down to this; None: not Matryoshka
    matryoshka_layer_norm: bool = False        # layer-norm the full vector before cutting (nomic-embed-text v1.5's recipe)
    truncate: bool = False                     # over-long inputs: cut to the model's limit instead of 400
    trust_remote_code: bool = False
    threads: int | None = Field(None, ge=1)


class DeploymentConf(_Strict):
    name: str
    model: str                                 # the public model name it serves (models: in this file)
    node: str
    engine: Engine
    weights: str                               # pypi:PACKAGE | pypi-wheel:DIST[==V]/PATH.gguf | a folder | a .gguf file | a hub id
    served_model_name: str | None = None       # the name the engine answers with (responses' `model`)
    autoload: bool = True                      # loaded when the node starts; false: an alternative for swaps
    gpus: list[int] = []                       # GPU indices on the node (CUDA_VISIBLE_DEVICES)
    gpu_memory: float | None = Field(None, gt=0, le=1)   # share of each of its GPUs it may take
    max_model_len: int | None = Field(None, ge=16)
    chat_template: str | None = None           # a name under inference/templates (gemma), or a file
    env: dict[str, str] = {}
    startup_timeout_s: float = Field(900.0, gt=0)
    restart: RestartConf = RestartConf()
    vllm: VLLMConf | None = None
    transformers: TransformersConf | None = None
    embeddings: EmbeddingsConf | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v.startswith("pypi-wheel:"):
            WheelSource.parse(v)
        return v

    @model_validator(mode="after")
    def _engine_section(self) -> "DeploymentConf":
        for other in ("vllm", "transformers", "embeddings"):
            if other != self.engine and getattr(self, other) is not None:
                raise ValueError(f"has a '{other}' section but its engine is '{self.engine}'")
        if getattr(self, self.engine) is None:
            setattr(self, self.engine, {"vllm": VLLMConf, "transformers": TransformersConf,
                                        "embeddings": EmbeddingsConf}[self.engine]())
        if self.gpus and self.gpu_memory is None:
            if self.engine == "vllm":
                self.gpu_memory = 0.9
            else:
                raise ValueError("gpus are given but gpu_memory is not: say what share of each GPU it takes")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus {self.gpus} lists a GPU twice")
        if self.engine == "vllm":
            tp = self.vllm.tensor_parallel_size
            if tp is not None and self.gpus and tp != len(self.gpus):
                raise ValueError(f"vllm.tensor_parallel_size {tp} differs from the {len(self.gpus)} gpus given")
        elif len(self.gpus) > 1:
            raise ValueError(f"the {self.engine} engine runs on one GPU; {len(self.gpus)} given")
        else:
            dev = getattr(self, self.engine).device
            if self.gpus and not dev.startswith("cuda") and dev != "cpu":
                raise ValueError(f"{self.engine}.device {dev!r}: use cpu or cuda")
        return self

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.weights.removeprefix("pypi:")

    @property
    def tp_size(self) -> int:
        if self.engine == "vllm" and self.vllm.tensor_parallel_size:
            return self.vllm.tensor_parallel_size
        return max(1, len(self.gpus))

    def template_path(self) -> Path | None:
        """The chat template file: a bundled name (gemma) or a path."""
        t = self.chat_template
        if not t:
            return None
        bundled = TEMPLATES / f"{t}.jinja"
        if bundled.exists():
            return bundled
        return Path(t).expanduser()


class ProfileConf(_Strict):
    description: str = ""
    nodes: list[NodeConf]
    deployments: list[DeploymentConf] = []
    unserved: dict[str, str] = {}              # public model -> why this profile does not serve it


def _check_profile(name: str, prof: ProfileConf, local_models: set[str]) -> list[str]:
    errs = []
    nodes = {n.name: n for n in prof.nodes}
    if len(nodes) != len(prof.nodes):
        errs.append(f"profiles.{name}.nodes: two nodes share a name")
    seen: set[str] = set()
    for i, d in enumerate(prof.deployments):
        where = f"profiles.{name}.deployments[{i}] ({d.name})"
        if d.name in seen:
            errs.append(f"{where}.name: another deployment has this name")
        seen.add(d.name)
        if d.model not in local_models:
            errs.append(f"{where}.model: {d.model!r} is not a model of a local provider under models: "
                        f"({', '.join(sorted(local_models))})")
        node = nodes.get(d.node)
        if node is None:
            errs.append(f"{where}.node: {d.node!r} is not under profiles.{name}.nodes ({', '.join(nodes)})")
        elif isinstance(node.gpus, list) and d.gpus:
            have = {g.index for g in node.gpus}
            missing = [g for g in d.gpus if g not in have]
            if missing:
                errs.append(f"{where}.gpus: node {d.node} has no GPU {missing} (it has {sorted(have)})")
        tp = d.template_path()
        if tp is not None and not tp.exists():
            errs.append(f"{where}.chat_template: no bundled template or file {d.chat_template!r}")
    # Deployments loaded at start must fit together on their GPUs.
    for n in prof.nodes:
        use: dict[int, list[tuple[str, float]]] = {}
        for d in prof.deployments:
            if d.node == n.name and d.autoload:
                for g in d.gpus:
                    use.setdefault(g, []).append((d.name, d.gpu_memory or 0.0))
        for g, lst in use.items():
            total = sum(s for _, s in lst)
            if total > 1.0 + 1e-9:
                errs.append(f"profiles.{name}.deployments: on node {n.name}, GPU {g} is over-committed by the "
                            f"autoload deployments " + ", ".join(f"{a} ({s:g})" for a, s in lst) +
                            f" = {total:g} of its memory")
    for m in prof.unserved:
        if m not in local_models:
            errs.append(f"profiles.{name}.unserved: {m!r} is not a local model")
    return errs


class InferenceConf:
    """The chosen profile of one models.yaml."""

    def __init__(self, path: Path, name: str, profile: ProfileConf):
        self.path = path
        self.name = name
        self.profile = profile

    def node(self, name: str | None) -> NodeConf:
        nodes = self.profile.nodes
        if name is None:
            if len(nodes) == 1:
                return nodes[0]
            raise ConfigError(f"{self.path}: profile {self.name} has several nodes "
                              f"({', '.join(n.name for n in nodes)}); say which with --name")
        for n in nodes:
            if n.name == name:
                return n
        raise ConfigError(f"{self.path}: profile {self.name} has no node {name!r} "
                          f"(it has {', '.join(n.name for n in nodes)})")

    def deployments_of(self, node: str) -> list[DeploymentConf]:
        return [d for d in self.profile.deployments if d.node == node]


def load_inference(path: str | os.PathLike, profile: str | None = None) -> InferenceConf:
    path = Path(path)
    raw = read_yaml_mapping(path, ConfigError)
    name = chosen_profile(raw, profile)
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict) or name not in profiles:
        raise ConfigError(f"{path}: profiles: no profile {name!r} (have: {', '.join(profiles) or 'none'})")
    providers = raw.get("providers") or {}
    local_models = {m.get("name") for m in raw.get("models") or [] if isinstance(m, dict)
                    and (providers.get(m.get("provider")) or {}).get("local")}
    checked = {}
    errs: list[str] = []
    for pname, praw in profiles.items():   # every profile is checked, not only the one in use
        try:
            checked[pname] = ProfileConf.model_validate(praw)
        except ValidationError as e:
            errs.append(format_validation(e, praw, f"profiles.{pname}"))
            continue
        errs += _check_profile(pname, checked[pname], local_models)
    if errs:
        raise ConfigError(f"{path}: " + "; ".join(errs))
    return InferenceConf(path, name, checked[name])
