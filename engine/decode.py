"""The decoding engine as operations on a batch: admit (prefill), step (propose -> verify -> accept
-> commit) and filter. Standard decoding is the same step with the root-only tree.

Every forward sees the whole running batch at once: sequence b has its own cache length L_b, its
own tree (padded to the step's T nodes), and its nodes sit at positions L_b + depth. A 4-D
additive mask lets each node see its sequence's prefix, its ancestors and itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from engine.batch import Batch, Round
from engine.cuda_graphs import StepGraphs, batch_bucket, kv_bucket
from engine.detokenizer import TextStream
from engine.kv_cache import KVCache, step_mask
from engine.messages import Event, Request, TokenLogprob
from engine.sampling import Accepted, Sampled, Uniforms, accept, token_logprobs
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tree import ROOT, StepTrees, Tree, stack_trees
from medusa_model import MedusaModel

if TYPE_CHECKING:
    from engine.adaptive import TreeChooser

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: MedusaModel,
        tokenizer: PreTrainedTokenizerBase,
        tree: Tree = ROOT,
        max_batch_size: int = 8,
        max_context: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        cuda_graphs: bool = True,
    ):
        if tree.depth > model.num_heads:
            raise ValueError(f"tree {tree.name!r} is {tree.depth} deep but the model has {model.num_heads} heads")
        self.model = model
        self.tokenizer = tokenizer
        self.tree = tree
        self.max_batch_size = max_batch_size
        self.max_context = min(max_context or math.inf, model.config.max_position_embeddings)
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.chooser: TreeChooser | None = None  # set: each step's tree is chosen for its batch (adaptive.py)
        # a sequence whose step fails is retried alone (see step); not in tensor-parallel lockstep, where
        # a retry on one rank would run forwards (all-reduces) that the other ranks do not
        self.isolates_failures = True

    # ---- data ----------------------------------------------------------------------------------

    def new_batch(self) -> Batch:
        cfg, slots, dev = self.model.config, self.max_batch_size, self.model.device
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        capacity = self.max_context + self.tree.num_nodes  # a step writes its whole tree past the prefix
        cache = KVCache(
            cfg.num_hidden_layers, slots, self.model.kv_heads, capacity, head_dim, self.model.dtype, dev
        )
        zeros = torch.zeros(slots, dtype=torch.long, device=dev)
        hidden = torch.zeros(slots, cfg.hidden_size, dtype=self.model.dtype, device=dev)
        graphs = StepGraphs() if self.cuda_graphs else None
        return Batch(cache, zeros.clone(), zeros.clone(), hidden, [], [], [0] * slots, graphs)

    def free_slots(self, batch: Batch) -> int:
        return self.max_batch_size - len(batch.seqs)

    # ---- operations ----------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, batch: Batch, requests: list[Request]) -> list[Event]:
        """Prefill new requests into free slots, in one forward; each emits its first token. If that
        forward fails, each request is prefilled alone, and one that fails again fails by itself."""
        if len(requests) > self.free_slots(batch):
            raise ValueError(f"{len(requests)} requests for {self.free_slots(batch)} free slots")
        for r in requests:
            if not r.prompt_ids or len(r.prompt_ids) + r.max_new_tokens > self.max_context:
                raise ValueError(f"request {r.id}: prompt + max_new_tokens must fit in {self.max_context} tokens")
        seqs = [self._sequence(r) for r in requests]
        try:
            return self._prefill(batch, seqs)
        except Exception:
            if not self.isolates_failures:
                raise
            if len(seqs) == 1:
                return self._failed(batch, seqs[0], "prefill")
            log.exception("a prefill of %d requests failed; prefilling each alone", len(seqs))
        return [e for seq in seqs for e in self._isolated(batch, seq, "prefill", self._prefill, batch, [seq])]

    @torch.inference_mode()
    def step(self, batch: Batch) -> list[Event]:
        """One decode step for every running sequence: (choose ->) propose -> verify -> accept -> commit.
        If it fails, each sequence steps alone, and one that fails again fails by itself: nothing a
        request brings can fail the others (a step changes nothing before it commits)."""
        if self.chooser is not None:
            self._choose(batch)
        try:
            return self._step(batch, slice(0, len(batch.seqs)))
        except Exception:
            if not self.isolates_failures:
                raise
            if len(batch.seqs) == 1:
                return self._failed(batch, batch.seqs[0], "step")
            log.exception("a step of %d sequences failed; stepping each alone", len(batch.seqs))
        return [e for i, seq in enumerate(batch.seqs)
                for e in self._isolated(batch, seq, "step", self._step, batch, slice(i, i + 1))]

    def filter(self, batch: Batch) -> list[Sequence]:
        """Drop finished and cancelled sequences, moving the rest down so that slots stay compact."""
        keep = [i for i, s in enumerate(batch.seqs) if not s.done]
        if len(keep) == len(batch.seqs):
            return []
        done = [s for s in batch.seqs if s.done]
        for new, old in enumerate(keep):
            if new != old:
                batch.cache.copy_slot(old, new, int(batch.lengths[old]))
        index = torch.tensor(keep, dtype=torch.long, device=batch.lengths.device)
        for t in (batch.lengths, batch.next_tokens, batch.hidden):
            t[: len(keep)] = t[index]
        batch.host_lengths[: len(keep)] = [batch.host_lengths[i] for i in keep]
        batch.seqs = [batch.seqs[i] for i in keep]
        batch.trees = [batch.trees[i] for i in keep]
        return done

    # ---- a round's two forwards -----------------------------------------------------------------

    def _sequence(self, r: Request) -> Sequence:
        uniforms = None if r.sampling.greedy else Uniforms(r.sampling.seed)
        return Sequence(r, TextStream(self.tokenizer, r.prompt_ids, r.stop), self.eos_token_ids, uniforms=uniforms)

    def _prefill(self, batch: Batch, seqs: list[Sequence]) -> list[Event]:
        """Prefill seqs into the next free slots; they join the batch only once it has succeeded."""
        if not seqs:
            return []
        requests = [s.request for s in seqs]
        start, dev = len(batch.seqs), self.model.device
        rows = slice(start, start + len(seqs))
        lens = torch.tensor([len(r.prompt_ids) for r in requests], device=dev)
        t = int(lens.max())
        ids = torch.zeros(len(requests), t, dtype=torch.long, device=dev)  # right-padded prompts
        for i, r in enumerate(requests):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        arange = torch.arange(t, device=dev)
        causal = (arange[None, :, None] >= arange[None, None, :]) & (arange[None, None, :] < lens[:, None, None])
        last = lens - 1
        score = any(r.score_prompt for r in requests)
        keep = 0 if score else last[:, None]  # every position's logits only when a prompt is scored
        logits, hidden = self._forward(batch, rows, ids, torch.zeros_like(lens), causal,
                                       arange.expand(len(requests), t), t, keep)
        at = last[:, None] if score else torch.zeros_like(last)[:, None]  # [B, 1]: where the next-token logits are
        b_index = torch.arange(len(requests), device=dev)
        first = self._first_tokens(seqs, logits[b_index, at[:, 0]])  # [B]
        logprobs = self._logprobs(seqs, logits, at, first[:, None], [1] * len(seqs))
        prompt_logprobs = [token_logprobs(logits[i, : len(r.prompt_ids) - 1], ids[i, 1 : len(r.prompt_ids)],
                                          r.logprobs or 0) if r.score_prompt else None  # token j predicted at j - 1
                           for i, r in enumerate(requests)]
        # commit: nothing above changed the batch
        batch.seqs += seqs
        batch.trees += [self.tree if r.speculative else ROOT for r in requests]
        batch.lengths[rows] = lens
        batch.host_lengths[rows] = [len(r.prompt_ids) for r in requests]
        self._set_next(batch, rows, first, hidden[b_index, last])
        self._advance(seqs, [1] * len(seqs))
        return [replace(e, prompt_logprobs=p) if p is not None else e
                for seq, tok, lp, p in zip(seqs, first.tolist(), logprobs, prompt_logprobs)
                for e in self._extend(batch, seq, [tok], False, lp)]

    def _step(self, batch: Batch, rows: slice) -> list[Event]:
        seqs = batch.seqs[rows]
        trees = stack_trees(tuple(batch.trees[rows]), self.model.device)
        tokens = self._propose(batch, rows, trees)
        logits, hidden = self._verify(batch, rows, tokens, trees)
        accepted = self._accept(seqs, tokens, logits, trees)
        if self.chooser is not None:
            self.chooser.record(batch.trees[rows], accepted)
        return self._commit(batch, rows, accepted, logits, hidden, trees.chains)

    def _isolated(self, batch: Batch, seq: Sequence, what: str, run, *args) -> list[Event]:
        """run(*args) for one sequence, after a batched forward failed; if it fails, that sequence fails."""
        try:
            return run(*args)
        except Exception:
            return self._failed(batch, seq, what)

    def _failed(self, batch: Batch, seq: Sequence, what: str) -> list[Event]:
        """seq ends with an error (reported as such); a sequence that never joined joins to leave."""
        log.exception("request %s failed in its %s", seq.request.id, what)
        seq.fail()
        if seq not in batch.seqs:  # a failed prefill: the next filter drops it like any finished sequence
            batch.seqs.append(seq)
            batch.trees.append(ROOT)
        return []

    # ---- step phases ---------------------------------------------------------------------------

    def _choose(self, batch: Batch) -> None:
        """This step's tree for the speculative sequences, from the batch's make-up; standard ones stay root-only."""
        speculative = sum(s.request.speculative for s in batch.seqs)
        tree = self.chooser.choose(speculative, len(batch.seqs) - speculative)
        batch.trees = [tree if s.request.speculative else ROOT for s in batch.seqs]

    def _propose(self, batch: Batch, rows: slice, trees: StepTrees) -> torch.Tensor:
        """Candidate tokens [B, T]: the root, then each node's rank-r token from its head. The heads run
        only for a step that verifies more than roots: standard decoding, and a step whose adaptive
        tree is root only, pay nothing for them; a shallower tree than the heads runs only the heads it
        uses, and asks each for only the ranks it uses."""
        roots = batch.next_tokens[rows, None]
        if trees.num_nodes == 1:
            return roots
        proposals = self.model.head_topk(batch.hidden[rows], trees.topk, roots[:, 0], trees.depth)  # [B, K, topk]
        flat = trees.heads * proposals.shape[-1] + trees.ranks
        nodes = proposals.flatten(1).gather(1, flat)
        return torch.cat([roots, nodes[:, 1:]], dim=1)

    def _verify(self, batch: Batch, rows: slice, tokens: torch.Tensor, trees: StepTrees):
        """The tree forward at a static shape: rows and key length rounded up to buckets, captured as a
        CUDA graph on CUDA. Padding rows are free cache slots whose nodes see only themselves at
        position 0. Returns the running rows' logits [B, T, V] and hidden states [B, T, H]."""
        b, t = tokens.shape
        whole = rows.start == 0 and b == len(batch.seqs)  # else one sequence alone: no padding rows (they
        size = batch_bucket(b, self.max_batch_size) if whole else b  # would be other sequences' slots)
        kv_len = kv_bucket(max(batch.host_lengths[rows]) + t, batch.cache.capacity)
        lengths, mask, depths = batch.lengths[rows], trees.mask, trees.depths
        if size > b:
            pad = size - b
            tokens = torch.cat([tokens, tokens.new_zeros(pad, t)])
            lengths = torch.cat([lengths, lengths.new_zeros(pad)])
            mask = torch.cat([mask, torch.eye(t, dtype=torch.bool, device=mask.device).expand(pad, t, t)])
            depths = torch.cat([depths, depths.new_zeros(pad, t)])
        inputs = (tokens, lengths, mask, depths)

        def forward(*x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._forward(batch, slice(rows.start, rows.start + size), *x, kv_len)

        if batch.graphs is None or not whole:
            logits, hidden = forward(*inputs)
        else:
            logits, hidden = batch.graphs.run((size, t, kv_len), forward, *inputs)
        return logits[:b], hidden[:b]

    def _first_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The token after each prompt, from the logits [B, V] at its last position: a root-only step."""
        roots = torch.zeros(len(seqs), 1, dtype=torch.long, device=logits.device)  # unused by a root-only accept
        return self._accept(seqs, roots, logits[:, None], stack_trees((ROOT,) * len(seqs), logits.device)).tokens[:, 0]

    def _accept(self, seqs: list[Sequence], tokens: torch.Tensor, logits: torch.Tensor, trees: StepTrees
                ) -> Accepted:
        """The path each sequence keeps and its bonus token (the draws are used up at commit)."""
        params = [seq.request.sampling for seq in seqs]
        uniforms = [seq.uniforms for seq in seqs]
        sampled = Sampled.of(params, uniforms, trees.retrieve.shape[-1], logits.shape[-1], logits.device)
        return accept(tokens, logits, trees.depths, trees.retrieve, sampled)

    @staticmethod
    def _advance(seqs: list[Sequence], counts: list[int]) -> None:
        """Sampling sequences use up the uniform numbers of the nodes they accepted."""
        for seq, count in zip(seqs, counts):
            if seq.uniforms is not None:
                seq.uniforms.advance(seq.request.sampling.draws(count))

    def _commit(self, batch: Batch, rows: slice, acc: Accepted, logits: torch.Tensor, hidden: torch.Tensor,
                in_place: bool) -> list[Event]:
        """Keep the accepted nodes' K/V right after each prefix, advance lengths, set the next roots.
        `in_place`: the accepted nodes are already there (chains: node j of a path is written at j)."""
        seqs = batch.seqs[rows]
        counts, tokens = acc.count.tolist(), acc.tokens.tolist()
        logprobs = self._logprobs(seqs, logits, acc.nodes, acc.tokens, counts)
        lengths = batch.lengths[rows]
        last = (acc.count - 1)[:, None]  # [B, 1]: position of the last accepted node on its path
        if acc.nodes.shape[1] > 1 and not in_place:
            dst = torch.arange(acc.nodes.shape[1], device=lengths.device)
            batch.cache.move(rows, lengths[:, None] + acc.nodes, lengths[:, None] + dst)
        batch.lengths[rows] += acc.count
        last_node = acc.nodes.gather(1, last)[:, 0]
        rows_index = torch.arange(hidden.shape[0], device=hidden.device)
        self._set_next(batch, rows, acc.tokens.gather(1, last)[:, 0], hidden[rows_index, last_node])
        batch.host_lengths[rows] = [n + c for n, c in zip(batch.host_lengths[rows], counts)]
        self._advance(seqs, counts)
        return [e for seq, tok, c, lp in zip(seqs, tokens, counts, logprobs)
                for e in self._extend(batch, seq, tok[:c], True, lp)]

    def _extend(self, batch: Batch, seq: Sequence, tokens: list[int], from_step: bool,
                logprobs: list[TokenLogprob] | None) -> list[Event]:
        """seq's event for its new tokens (its text, its stops); if that fails, seq alone fails."""
        try:
            return [seq.extend(tokens, from_step, logprobs)]
        except Exception:
            return self._failed(batch, seq, "detokenisation")

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: torch.Tensor, nodes: torch.Tensor, tokens: torch.Tensor,
                  counts: list[int]) -> list[list[TokenLogprob] | None]:
        """For the sequences that asked: log-probs of their first counts[b] tokens (tokens [B, D]),
        token j chosen from the logits [B, T, V] at node nodes[b, j]."""
        out = []
        for b, (seq, n) in enumerate(zip(seqs, counts)):
            top = seq.request.logprobs
            out.append(None if top is None else token_logprobs(logits[b, nodes[b, :n]], tokens[b, :n], top))
        return out

    def _set_next(self, batch: Batch, rows: slice, roots: torch.Tensor, hidden: torch.Tensor) -> None:
        """Record each sequence's next root and its hidden state [B, H], for the next step's heads."""
        batch.next_tokens[rows] = roots
        batch.hidden[rows] = hidden

    def _forward(
        self,
        batch: Batch,
        rows: slice,
        tokens: torch.Tensor,  # [B, T]
        lengths: torch.Tensor,  # [B] tokens already cached per sequence
        tree_mask: torch.Tensor,  # [B, T, T] bool: node t sees node u
        depths: torch.Tensor,  # [B, T]
        kv_len: int,  # keys each row reads: at least its length + T (no reading it back from the device)
        logits_to_keep: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        write = lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, T]: their cache rows
        mask = step_mask(lengths, write, tree_mask, kv_len, self.model.dtype)
        return self.model.forward(tokens, attention_mask=mask, position_ids=lengths[:, None] + depths,
                                  cache=batch.cache.writer(rows, write, kv_len), logits_to_keep=logits_to_keep)

    # ---- loops ---------------------------------------------------------------------------------

    def round(self, batch: Batch, arrivals: list[Request]) -> Round:
        """One round of continuous batching: admit arrivals into free slots, drop the finished, step
        every running sequence, drop the finished."""
        events = self.admit(batch, arrivals)
        finished = self.filter(batch)
        stepped, tree = len(batch.seqs), None
        if batch.seqs:
            events += self.step(batch)
            tree = next((t.describe() for t, s in zip(batch.trees, batch.seqs) if s.request.speculative), None)
            finished += self.filter(batch)
        return Round(events, finished, stepped, tree)

    def run(self, requests: Iterable[Request]) -> Iterator[tuple[list[Event], list[Sequence]]]:
        """Rounds until every request has finished, admitted as slots free up; yields each round's
        events and finished sequences."""
        batch, scheduler = self.new_batch(), Scheduler(self.max_batch_size, requests=requests)
        while scheduler.waiting or batch.seqs:
            done = self.round(batch, scheduler.next_round(self.free_slots(batch)).arrivals)
            yield done.events, done.finished

    def generate(self, requests: list[Request]) -> list[Sequence]:
        """Run a batch of requests to completion; results in request order."""
        done = {s.request.id: s for _, finished in self.run(requests) for s in finished}
        return [done[r.id] for r in requests]

    def generate_stream(self, requests: list[Request]) -> Iterator[Event]:
        """Token deltas of a batch of requests as they are produced."""
        for events, _ in self.run(requests):
            yield from events


def _eos_ids(model: MedusaModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = model.model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
