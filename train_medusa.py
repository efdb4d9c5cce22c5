"""Training Medusa heads on a frozen base model (Medusa-1 recipe).

Loss = sum over heads of 0.8^k * CE(head k's logits at t, token t+2+k); AdamW with a cosine
schedule. Self-distillation trains on the base model's own greedy continuations, which is exactly
what greedy verification accepts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from medusa_model import MedusaModel

HEAD_DECAY = 0.8


def medusa_loss(head_logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
    """head_logits [B, T, K, V], input_ids [B, T], valid [B, T] bool -> (loss, per-head CE list)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
    total, per_head = head_logits.new_zeros(()), []
    for k in range(head_logits.shape[2]):
        shift = k + 2
        keep = valid[:, shift:] & valid[:, :-shift]
        ce = F.cross_entropy(head_logits[:, :-shift, k][keep], input_ids[:, shift:][keep])
        total = total + HEAD_DECAY**k * ce
        per_head.append(ce.item())
    return total, per_head


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64, pad_id: int = 0
) -> list[list[int]]:
    """Prompt + the base model's greedy continuation for each prompt (self-distillation data).
    Prompts are left-padded into batches; the padding is removed from the result."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        seqs = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
        )
        out += [seq[width - len(p) :].tolist() for p, seq in zip(chunk, seqs)]
    return out


class MedusaTrainer:
    """Trains `model.heads`; the base model stays frozen."""

    def __init__(self, model: MedusaModel, total_steps: int, lr: float = 1e-3, warmup_steps: int = 0):
        self.model = model
        model.model.requires_grad_(False)
        params = [p for p in model.heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model.forward(input_ids, attention_mask=attention_mask, logits_to_keep=1)[1]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
        """One optimiser step on a batch [B, T]; returns each head's CE."""
        valid = None if attention_mask is None else attention_mask.bool()
        return self.fit(self.hidden(input_ids, attention_mask), input_ids, valid)

    def fit(self, hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> list[float]:
        """One optimiser step from the base model's hidden states [B, T, H] (computed once when the
        same data is seen many times: the base is frozen)."""
        self.model.heads.train()
        loss, per_head = medusa_loss(self.model.head_logits(hidden), input_ids, valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.heads.eval()
        return per_head

    @torch.no_grad()
    def accuracy(self, input_ids: torch.Tensor, k: int = 1) -> list[float]:
        """Each head's top-k accuracy at predicting token t+2+head on `input_ids` [B, T]."""
        logits = self.model.head_logits(self.hidden(input_ids))  # [B, T, K, V]
        top = logits.topk(k, dim=-1).indices  # [B, T, K, k]
        acc = []
        for head in range(logits.shape[2]):
            shift = head + 2
            hit = (top[:, :-shift, head] == input_ids[:, shift:, None]).any(-1)
            acc.append(hit.float().mean().item())
        return acc
