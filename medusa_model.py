"""Medusa heads on a Hugging Face causal LM, and the DeepSpeed-Inference wrapping of the base.

Head k (0-based) reads the base model's last hidden state h_t (after the final norm) and predicts
token t+2+k; the base lm_head predicts t+1. A head is L residual blocks `x + SiLU(W x + b)`, each
with its own weights, then its own `Linear(hidden, vocab)` initialised from the base lm_head, or,
in the "version 2" layout, the base lm_head itself.

Heads may also read the root token (`reads_root_token`): the token t+1 that the base model's own
logits chose at t, which is known before the heads run (it is the root of the step's tree). Head k
then reads h_t + R_k e(t+1), with e the base model's input embedding and R_k [H, H] its own (zero
at first: the plain Medusa head). Knowing t+1 is most of what a head predicting t+2 lacks; it is
the idea of EAGLE's "feature and shifted token" and of Hydra's sequential heads, kept to the one
token that every node of the tree shares, so all heads still run in one pass.

Heads may draft over a truncated vocabulary (vLLM's `truncated_vocab_size` and `token_map`): their
projection then has a row per token of `token_map` only (the most frequent tokens), which costs a
fraction of the full one; proposals are mapped back to token ids. Verification still uses the base
model's full vocabulary, so output does not change; only what the heads can propose does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    truncated_vocab_size: int | None = None  # heads draft over this many tokens (token_map) only
    reads_root_token: bool = False  # heads read h_t + R_k e(root token t+1): `root` [K, H, H]


class MedusaHeads(nn.ModuleList):
    """K heads; state-dict keys `{i}.{j}.linear.*`, with own lm_heads `{i}.{L}.weight`, and with a
    truncated vocabulary `token_map` [V'] (the token id of each row of the heads' projection), and
    reading the root token `root` [K, H, H]."""

    def __init__(self, config: HeadsConfig, hidden_size: int, vocab_size: int):
        rows = config.truncated_vocab_size or vocab_size

        def head() -> nn.Sequential:
            blocks = [ResBlock(hidden_size) for _ in range(config.num_layers)]
            own = [] if config.shares_lm_head else [nn.Linear(hidden_size, rows, bias=False)]
            return nn.Sequential(*blocks, *own)

        super().__init__([head() for _ in range(config.num_heads)])
        self.config = config
        self.vocab_size = vocab_size
        if config.truncated_vocab_size:
            self.register_buffer("token_map", torch.arange(rows))
        else:
            self.token_map = None
        if config.reads_root_token:  # a parameter, not a module: the ModuleList holds the heads only
            self.root = nn.Parameter(torch.zeros(config.num_heads, hidden_size, hidden_size))
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None  # (lm_head weight, its kept rows)

    def init_lm_heads(self, lm_head: nn.Linear, token_map: torch.Tensor | None = None) -> None:
        """Set the truncated vocabulary (token_map [V'], when the config has one), and initialise each
        head's own lm_head as a copy of the base lm_head's rows (Medusa-1)."""
        if token_map is not None:
            self.token_map.copy_(token_map)
        if not self.config.shares_lm_head:
            for head in self:
                head[-1].weight.data.copy_(self._rows(lm_head.weight.data))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.token_map is None else weight[self.token_map]

    def _shared_projection(self, lm_head: nn.Module) -> torch.Tensor:
        """The base lm_head's rows the heads draft over ([V', H]; gathered once: the base is frozen)."""
        weight = lm_head.weight
        if self._projection is None or self._projection[0] is not weight:
            self._projection = (weight, weight.detach()[self.token_map])
        return self._projection[1]

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None, root: torch.Tensor | None = None,
                count: int | None = None) -> torch.Tensor:
        """hidden [..., H] -> head logits [..., K, V'] over the heads' vocabulary (V' = V untruncated);
        heads reading the root token also take its embedding `root` [..., H]. `count`: only the first
        heads (K = count; a tree that deep needs no more).
        The whole vocabulary goes through the lm_head module itself (tensor parallel: DeepSpeed's,
        which gathers its shards); a truncated one through the kept rows of its weight. Without an
        lm_head, shared heads return their drafts [..., K, H], before the projection."""
        if self.config.reads_root_token:
            if root is None:
                raise ValueError("these heads read the root token: pass its embedding")
            read = torch.einsum("...i,koi->...ko", root, self.root[:count])  # [..., K, H]: R_k e(t+1)
            drafts = torch.stack([head(hidden + read[..., k, :]) for k, head in enumerate(list(self)[:count])], dim=-2)
        else:
            drafts = torch.stack([head(hidden) for head in list(self)[:count]], dim=-2)
        if not self.config.shares_lm_head or lm_head is None:
            return drafts
        if self.token_map is None:
            return lm_head(drafts)
        return F.linear(drafts, self._shared_projection(lm_head))

    def token_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the heads' vocabulary -> token ids."""
        return rows if self.token_map is None else self.token_map[rows]

    def rows_of(self, token_ids: torch.Tensor, missing: int = -100) -> torch.Tensor:
        """Token ids -> rows of the heads' vocabulary (`missing` for tokens outside it)."""
        if self.token_map is None:
            return token_ids
        index = torch.full((self.vocab_size,), missing, dtype=torch.long, device=token_ids.device)
        index[self.token_map] = torch.arange(len(self.token_map), device=token_ids.device)
        return index[token_ids]


class MedusaModel:
    """A causal LM plus Medusa heads. Every base forward goes through `runner`: the DeepSpeed
    InferenceEngine when the model is wrapped, else the model itself."""

    def __init__(self, model: PreTrainedModel, heads: MedusaHeads | None = None, runner: nn.Module | None = None,
                 tp_size: int = 1, weights: str = "", lm_head: nn.Linear | None = None,
                 head_projection: nn.Module | None = None, drafts: nn.Module | None = None):
        self.model = model
        self.weights = weights  # where the base weights came from, and in which form they are served
        self.heads = heads
        self.runner = runner if runner is not None else model
        # what heads sharing the base lm_head project through: the model's own, unless quantised (then the float one)
        self.lm_head = lm_head if lm_head is not None else model.get_output_embeddings()
        # set: heads sharing the lm_head project their drafts through this instead (int4: the same rows, in int4)
        self.head_projection = head_projection
        # set: the heads' drafts before the projection (int4: their matrices in the kernel, int4.Int8Drafts)
        self.drafts = drafts
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

    def head_logits(self, hidden: torch.Tensor, roots: torch.Tensor | None = None, count: int | None = None
                    ) -> torch.Tensor:
        """hidden [..., H] at t, roots [...] (token t+1, for heads that read it) -> [..., K, V']: head
        k's logits for the token k+2 ahead, over the heads' vocabulary (rows of it: see
        MedusaHeads.token_ids); `count`: the first heads only (K = count)."""
        root = None
        if self.heads.config.reads_root_token:
            root = self.model.get_input_embeddings()(roots).to(hidden.dtype)
        if self.head_projection is not None:
            drafts = (self.drafts(hidden, root, count) if self.drafts is not None
                      else self.heads(hidden, None, root, count))
            return self.head_projection(drafts)
        return self.heads(hidden, self.lm_head, root, count)

    def head_topk(self, hidden: torch.Tensor, k: int, roots: torch.Tensor | None = None, count: int | None = None
                  ) -> torch.Tensor:
        """hidden [..., H], roots [...] -> [..., K, k]: the token ids each head ranks first to k-th
        (`count`: the first heads only)."""
        return self.heads.token_ids(self.head_logits(hidden, roots, count).topk(k, dim=-1).indices)


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
