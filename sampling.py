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
