"""Choosing what a verify step emits: the accepted path of each sequence's tree and its bonus token."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accepted:
    """Per sequence (B) of one step; D = padded depth + 1."""

    nodes: torch.Tensor  # [B, D] node indices of the chosen path, root first (entries past `count` are padding)
    count: torch.Tensor  # [B] accepted nodes including the root: the K/V rows to keep
    tokens: torch.Tensor  # [B, D] tokens to emit: path tokens after the root, then the bonus (past `count`: padding)


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, retrieve: torch.Tensor) -> Accepted:
    """A node is accepted when its token is the base argmax at its parent; the longest path wins.

    tokens [B, T] node tokens (root first), logits [B, T, V] base logits at each node,
    retrieve [B, P, D] root-to-leaf node indices padded with -1.
    """
    pred = logits.argmax(-1)  # [B, T]: greedy next token after each node
    if tokens.shape[1] == 1:  # root-only trees (standard decoding): the root's argmax is all there is
        return Accepted(nodes=torch.zeros_like(pred), count=torch.ones_like(pred[:, 0]), tokens=pred)
    b, p, d = retrieve.shape
    idx = retrieve.clamp(min=0).view(b, p * d)
    cand = tokens.gather(1, idx).view(b, p, d)  # token at each path position
    target = pred.gather(1, idx).view(b, p, d)  # greedy token after each path position
    match = (cand[:, :, 1:] == target[:, :, :-1]) & (retrieve[:, :, 1:] >= 0)  # [B, P, D-1]
    accepted = match.long().cumprod(-1).sum(-1)  # [B, P] accepted nodes below the root
    best = accepted.argmax(-1)  # [B]: first longest path
    rows = torch.arange(b, device=tokens.device)
    count = accepted[rows, best] + 1
    nodes = idx.view(b, p, d)[rows, best]  # [B, D]
    emitted = target[rows, best]  # [B, D]: position j holds the token that follows node j
    return Accepted(nodes=nodes, count=count, tokens=emitted)


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log p of the token, top alternatives by log p)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [N, V] of the distributions the tokens [N] were chosen from -> each token's log-prob and
    the `top` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return [(c, []) for c in chosen]
    values, ids = logp.topk(top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
