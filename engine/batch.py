"""The engine's state as data: the running Batch (its sequences, their cache and what each step
starts from) and what one round did (Round)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cuda_graphs import StepGraphs
from engine.kv_cache import KVCache
from engine.messages import Event
from engine.sequence import Sequence
from engine.tree import Tree


@dataclass
class Batch:
    """Running sequences; cache slot i holds seqs[i] (slots stay compact: see Engine.filter)."""

    cache: KVCache
    lengths: torch.Tensor  # [slots] tokens in each slot's cache
    next_tokens: torch.Tensor  # [slots] each sequence's last emitted token: the root of its next tree
    hidden: torch.Tensor  # [slots, H] each sequence's last hidden state: what the heads propose from
    seqs: list[Sequence]
    trees: list[Tree]
    host_lengths: list[int]  # lengths, as the host knows them without reading the device
    graphs: StepGraphs | None  # the verify forward's CUDA graphs (they hold this cache's addresses)

    def cancel(self, request_id: str) -> None:
        for seq in self.seqs:
            if seq.request.id == request_id:
                seq.cancel()


@dataclass(frozen=True)
class Round:
    """What one round did."""

    events: list[Event]
    finished: list[Sequence]  # left the batch this round (failed ones too)
    batch_size: int  # sequences the round's decode step decoded (0: no step)
    tree: dict | None  # Tree.describe() of the step's tree for speculative sequences, if it had any
