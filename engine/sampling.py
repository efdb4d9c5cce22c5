"""Choosing what a verify step emits: logit warping, then greedy, exact or typical acceptance of a
path through each sequence's tree, and the bonus token after it.

Greedy and exact acceptance are one rule with different targets: at every node the step picks the
token that follows it (the argmax, or a draw from the warped distribution), and a node is accepted
when its token is its parent's pick. Exact draws use one uniform number per emitted token, by
inverse CDF over the vocabulary in id order, so a seeded request emits the same tokens with and
without speculation. Typical acceptance (Medusa's) is faster at high temperature but is not
distribution-preserving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.messages import SamplingParams, TokenLogprob


class Uniforms:
    """One request's uniform numbers u_0, u_1, ... in [0, 1), fixed by its seed. They are drawn in
    fixed chunks, so the stream does not depend on how many a step looks at."""

    CHUNK = 64

    def __init__(self, seed: int | None):
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._buffer = torch.empty(0, dtype=torch.float64)

    def peek(self, n: int) -> torch.Tensor:
        while len(self._buffer) < n:
            chunk = torch.rand(self.CHUNK, generator=self._generator, dtype=torch.float64)
            self._buffer = torch.cat([self._buffer, chunk])
        return self._buffer[:n]

    def advance(self, n: int) -> None:
        self.peek(n)
        self._buffer = self._buffer[n:]


@dataclass(frozen=True)
class Sampled:
    """The sampling sequences of one step, S of the batch's B, and their parameters ([S] each)."""

    rows: torch.Tensor  # [S] their rows in the batch
    temperature: torch.Tensor
    top_k: torch.Tensor  # V where off
    top_p: torch.Tensor
    uniforms: torch.Tensor  # [S, D] the next D numbers of each stream (D = tree depth + 1)
    typical: torch.Tensor  # bool
    epsilon: torch.Tensor
    delta: torch.Tensor

    @staticmethod
    def of(params: list[SamplingParams], uniforms: list[Uniforms | None], depth: int, vocab: int,
           device: torch.device) -> Sampled | None:
        """None when every sequence is greedy (the step then never warps)."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return None
        ps = [params[i] for i in rows]

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        return Sampled(
            rows=column(rows, torch.long),
            temperature=column([p.temperature for p in ps]),
            top_k=column([p.top_k or vocab for p in ps], torch.long),
            top_p=column([p.top_p for p in ps]),
            uniforms=torch.stack([uniforms[i].peek(depth) for i in rows]).to(device=device, dtype=torch.float32),
            typical=column([p.acceptance == "typical" for p in ps], torch.bool),
            epsilon=column([p.typical_epsilon for p in ps]),
            delta=column([p.typical_delta for p in ps]),
        )


@dataclass(frozen=True)
class Accepted:
    """Per sequence (B) of one step; D = padded depth + 1."""

    nodes: torch.Tensor  # [B, D] node indices of the chosen path, root first (entries past `count` are padding)
    count: torch.Tensor  # [B] accepted nodes including the root: the K/V rows to keep
    tokens: torch.Tensor  # [B, D] tokens to emit: path tokens after the root, then the bonus (past `count`: padding)

    def with_rows(self, rows: torch.Tensor, other: Accepted) -> Accepted:
        """These results with rows `rows` replaced by `other`'s."""
        nodes, count, tokens = self.nodes.clone(), self.count.clone(), self.tokens.clone()
        nodes[rows], count[rows], tokens[rows] = other.nodes, other.count, other.tokens
        return Accepted(nodes, count, tokens)


# ---- warping and drawing ---------------------------------------------------------------------------


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [S, ..., V] -> probabilities [S, ..., V], in this order (as Hugging Face generate()):
    divide by the temperature; keep the top_k most likely tokens (ties: lower ids first); keep the
    smallest set of the most likely of those whose mass reaches top_p; renormalise. Per-sequence
    parameters are [S]; a filter no sequence uses costs nothing."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    scaled = logits.float() / temperature.view(shape)
    if bool((top_k < logits.shape[-1]).any()):
        scaled = _top_k(scaled, top_k.view(shape))
    probs = scaled.softmax(-1)
    if bool((top_p < 1).any()):
        probs = _top_p(probs, top_p.view(shape))
    return probs


def _top_k(scaled: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """-inf past each row's k largest values, found without a sort: all values above the k-th, then
    values equal to it in id order."""
    kth = scaled.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).expand(*scaled.shape[:-1], 1))
    above, tied = scaled > kth, scaled == kth
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return scaled.masked_fill(~keep, -torch.inf)


def _top_p(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep a token when the mass of the tokens before it (most likely first, ties: lower ids first) is
    under p, then renormalise."""
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = ((ordered.cumsum(-1) - ordered) < p) | (p >= 1)
    probs = probs * torch.zeros_like(keep).scatter_(-1, order, keep)
    return probs / probs.sum(-1, keepdim=True)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token x with cdf(x - 1) <= u < cdf(x), over token ids in order; probs [..., V], u [...]."""
    cdf = probs.cumsum(-1)
    x = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # rounding never lands past it
    return torch.minimum(x, last)


# ---- acceptance ----------------------------------------------------------------------------------


def accept(tokens: torch.Tensor, logits: torch.Tensor, depths: torch.Tensor, retrieve: torch.Tensor,
           sampled: Sampled | None) -> Accepted:
    """tokens [B, T] node tokens (root first), logits [B, T, V] base logits at each node, depths
    [B, T], retrieve [B, P, D] root-to-leaf node indices padded with -1."""
    targets = logits.argmax(-1)  # [B, T]: each node's greedy pick
    if sampled is None:
        return follow(tokens, targets, retrieve)
    probs = warp(logits[sampled.rows], sampled.temperature, sampled.top_k, sampled.top_p)  # [S, T, V]
    u = sampled.uniforms.gather(1, depths[sampled.rows])  # a node at depth d draws the step's d-th number
    targets[sampled.rows] = inverse_cdf(probs, u)
    accepted = follow(tokens, targets, retrieve)
    if tokens.shape[1] > 1 and bool(sampled.typical.any()):
        t = sampled.typical
        rows = sampled.rows[t]
        typical = typical_accept(tokens[rows], probs[t], retrieve[rows], sampled.epsilon[t], sampled.delta[t],
                                 sampled.uniforms[t, 0])
        accepted = accepted.with_rows(rows, typical)
    return accepted


def follow(tokens: torch.Tensor, targets: torch.Tensor, retrieve: torch.Tensor) -> Accepted:
    """Greedy and exact acceptance: a node is accepted when its token is its parent's target; the
    longest path wins (node tokens under one parent are distinct, so at most one path is followed).
    targets [B, T] the token picked after each node."""
    if tokens.shape[1] == 1:  # root-only trees (standard decoding): the root's pick is all there is
        return Accepted(nodes=torch.zeros_like(targets), count=torch.ones_like(targets[:, 0]), tokens=targets)
    b, p, d = retrieve.shape
    idx = retrieve.clamp(min=0).view(b, p * d)
    cand = tokens.gather(1, idx).view(b, p, d)  # token at each path position
    target = targets.gather(1, idx).view(b, p, d)  # pick after each path position
    match = (cand[:, :, 1:] == target[:, :, :-1]) & (retrieve[:, :, 1:] >= 0)  # [B, P, D-1]
    accepted = match.long().cumprod(-1).sum(-1)  # [B, P] accepted nodes below the root
    best = accepted.argmax(-1)  # [B]: first longest path
    rows = torch.arange(b, device=tokens.device)
    return Accepted(nodes=idx.view(b, p, d)[rows, best], count=accepted[rows, best] + 1, tokens=target[rows, best])


def typical_accept(tokens: torch.Tensor, probs: torch.Tensor, retrieve: torch.Tensor, epsilon: torch.Tensor,
                   delta: torch.Tensor, u: torch.Tensor) -> Accepted:
    """Medusa's typical acceptance: a node is accepted when its token x has p(x) > min(epsilon,
    delta * exp(-H(p))) under its parent's warped distribution p, and the parent is accepted; the
    longest path wins, ties by the summed log-probability of its tokens; the bonus token is drawn
    with u [S] at the last accepted node. tokens [S, T], probs [S, T, V], retrieve [S, P, D]."""
    s, p, d = retrieve.shape
    vocab = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [S, T]
    threshold = torch.minimum(epsilon[:, None], delta[:, None] * torch.exp(-entropy))  # [S, T]
    idx = retrieve.clamp(min=0)  # [S, P, D]
    cand = tokens.gather(1, idx.view(s, p * d)).view(s, p, d)
    parent = idx[:, :, :-1]
    p_cand = probs.view(s, -1).gather(1, (parent * vocab + cand[:, :, 1:]).view(s, -1)).view(s, p, d - 1)
    ok = (p_cand > threshold.gather(1, parent.reshape(s, -1)).view(s, p, d - 1)) & (retrieve[:, :, 1:] >= 0)
    kept = ok.long().cumprod(-1)  # [S, P, D-1]
    accepted = kept.sum(-1)  # [S, P]
    logp = (p_cand.clamp_min(1e-30).log() * kept).sum(-1)
    score = torch.where(accepted == accepted.max(-1, keepdim=True).values, logp, -torch.inf)
    best = score.argmax(-1)  # [S]
    rows = torch.arange(s, device=tokens.device)
    nodes, count = idx[rows, best], accepted[rows, best] + 1
    last = nodes.gather(1, (count - 1)[:, None])[:, 0]
    bonus = inverse_cdf(probs[rows, last], u)
    emitted = torch.cat([cand[rows, best, 1:], bonus[:, None]], dim=1)  # path tokens after the root, then a slot
    emitted.scatter_(1, (count - 1)[:, None], bonus[:, None])
    return Accepted(nodes=nodes, count=count, tokens=emitted)




def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [N, V] of the distributions the tokens [N] were chosen from -> each token's log-prob and
    the `top` most likely tokens with theirs (of the model's distribution, before warping)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return [(c, []) for c in chosen]
    values, ids = logp.topk(top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
