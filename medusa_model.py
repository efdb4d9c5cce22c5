"""Medusa heads on a Hugging Face causal LM, and the DeepSpeed-Inference wrapping of the base.

Head k (0-based) reads the base model's last hidden state h_t (after the final norm) and predicts
token t+2+k; the base lm_head predicts t+1. A head is L residual blocks `x + SiLU(W x + b)`, each
with its own weights, then its own `Linear(hidden, vocab)` initialised from the base lm_head, or,
in the "version 2" layout, the base lm_head itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a new head starts as the identity, i.e. as the lm_head
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


@dataclass(frozen=True)
class HeadsConfig:
    num_heads: int
    num_layers: int = 1
    shares_lm_head: bool = False  # "version 2": heads reuse the base lm_head


class MedusaHeads(nn.ModuleList):
    """K heads; state-dict keys `{i}.{j}.linear.*` and, with own lm_heads, `{i}.{L}.weight`."""

    def __init__(self, config: HeadsConfig, hidden_size: int, vocab_size: int):
        def head() -> nn.Sequential:
            blocks = [ResBlock(hidden_size) for _ in range(config.num_layers)]
            own = [] if config.shares_lm_head else [nn.Linear(hidden_size, vocab_size, bias=False)]
            return nn.Sequential(*blocks, *own)

        super().__init__([head() for _ in range(config.num_heads)])
        self.config = config

    def init_lm_heads(self, lm_head: nn.Linear) -> None:
        """Initialise each head's own lm_head as a copy of the base lm_head (Medusa-1)."""
        if not self.config.shares_lm_head:
            for head in self:
                head[-1].weight.data.copy_(lm_head.weight.data)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] -> head logits [..., K, V]."""
        if self.config.shares_lm_head:
            return lm_head(torch.stack([head(hidden) for head in self], dim=-2))
        return torch.stack([head(hidden) for head in self], dim=-2)


class MedusaModel:
    """A causal LM plus Medusa heads. Every base forward goes through `runner`: the DeepSpeed
    InferenceEngine when the model is wrapped, else the model itself."""

    def __init__(self, model: PreTrainedModel, heads: MedusaHeads | None = None, runner: nn.Module | None = None,
                 tp_size: int = 1):
        self.model = model
        self.heads = heads
        self.runner = runner if runner is not None else model
        self.lm_head = model.get_output_embeddings()
        self.tp_size = tp_size  # tensor-parallel ranks: each holds 1/tp_size of the attention heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads of this rank (the KV cache's shape)."""
        return self.config.num_key_value_heads // self.tp_size

    @property
    def num_heads(self) -> int:
        return len(self.heads) if self.heads is not None else 0

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> base logits [B, T', V] (T' per logits_to_keep), last hidden [B, T, H]."""
        out = self.runner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits, out.hidden_states[-1]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> [..., K, V]: head k's logits for the token k+2 ahead."""
        return self.heads(hidden, self.lm_head)


KERNEL_INJECT_REFUSED = (
    "DeepSpeed kernel injection cannot verify a Medusa tree (its fused kernels take no multi-token "
    "step on top of an existing cache); turn kernel injection off"
)


def wrap_with_deepspeed(
    model: PreTrainedModel, dtype: torch.dtype, tp_size: int = 1, kernel_inject: bool = False
) -> nn.Module:
    """deepspeed.init_inference with kernel injection off: its fused kernels cannot take several new
    tokens on top of an existing cache, which tree verification needs."""
    if kernel_inject:
        raise ValueError(KERNEL_INJECT_REFUSED)
    import deepspeed  # imported here: it is slow to import and logs at import time

    return deepspeed.init_inference(
        model, dtype=dtype, tensor_parallel={"tp_size": tp_size}, replace_with_kernel_inject=False
    )
