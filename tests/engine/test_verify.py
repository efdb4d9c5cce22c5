"""Greedy verification (`sampling.accept` with no sampling sequence) with hand-built logits whose
argmax is chosen, exact tensors asserted."""

from __future__ import annotations

import torch

from engine.sampling import accept as accept_step
from engine.tree import build_tree, stack_trees

V = 10
# Tree: root 0; node 1 = [0], node 2 = [1], node 3 = [0, 0], node 4 = [0, 1], node 5 = [0, 0, 0]
TREE = build_tree([[0], [1], [0, 0], [0, 1], [0, 0, 0]])


def logits_with_argmax(argmax: list[list[int]]) -> torch.Tensor:
    """[B, T, V] logits whose argmax at node t of sequence b is argmax[b][t]."""
    out = torch.zeros(len(argmax), len(argmax[0]), V)
    for b, row in enumerate(argmax):
        for t, token in enumerate(row):
            out[b, t, token] = 5.0
    return out


def accept(tokens: list[list[int]], argmax: list[list[int]], trees=None):
    trees = trees or (TREE,) * len(tokens)
    step = stack_trees(tuple(trees), torch.device("cpu"))
    return accept_step(torch.tensor(tokens), logits_with_argmax(argmax), step.depths, step.retrieve, None)


def test_tree_paths():
    assert TREE.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]


def test_reject_at_the_first_node():
    # node tokens:       root n1 n2 n3 n4 n5;  argmax at root is 9: neither 3 (n1) nor 4 (n2)
    acc = accept([[7, 3, 4, 5, 6, 8]], [[9, 0, 0, 0, 0, 0]])
    assert acc.count.tolist() == [1]
    assert acc.tokens[0, 0].item() == 9  # the bonus token: the base model's own choice


def test_partial_accept():
    # root -> n1 (3) accepted, n1 -> n3 (5) rejected (argmax 6 = n4's token) -> n4 accepted, n4 is a leaf
    acc = accept([[7, 3, 4, 5, 6, 8]], [[3, 6, 0, 0, 2, 0]])
    assert acc.count.tolist() == [3]
    assert acc.nodes[0, :3].tolist() == [0, 1, 4]
    assert acc.tokens[0, :3].tolist() == [3, 6, 2]  # n1, n4, then the bonus argmax after n4


def test_full_accept_plus_bonus():
    acc = accept([[7, 3, 4, 5, 6, 8]], [[3, 5, 0, 8, 0, 1]])
    assert acc.count.tolist() == [4]
    assert acc.nodes[0].tolist() == [0, 1, 3, 5]
    assert acc.tokens[0].tolist() == [3, 5, 8, 1]


def test_first_longest_path_wins_a_tie():
    # both n2 (path [1]) and n1 (path [0]) carry token 3; [0]'s subtree rejects, so both accept 1 node
    acc = accept([[7, 3, 3, 5, 6, 8]], [[3, 0, 4, 0, 0, 0]])
    assert acc.count.tolist() == [2]
    assert acc.nodes[0, :2].tolist() == [0, 2]  # the first path in retrieve order with 1 accepted node
    assert acc.tokens[0, :2].tolist() == [3, 4]


def test_several_sequences_with_their_own_trees():
    chain = build_tree([[0], [0, 0]])
    root = build_tree([])
    tokens = [[7, 3, 4, 5, 6, 8], [1, 2, 3, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
    argmax = [[3, 5, 0, 8, 0, 1], [2, 9, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]]
    acc = accept(tokens, argmax, (TREE, chain, root))
    assert acc.count.tolist() == [4, 2, 1]
    assert [row[:n] for row, n in zip(acc.nodes.tolist(), acc.count.tolist())] == [[0, 1, 3, 5], [0, 1], [0]]
    assert acc.tokens[0].tolist() == [3, 5, 8, 1]
    assert acc.tokens[1, :2].tolist() == [2, 9]
    assert acc.tokens[2, :1].tolist() == [6]


def test_padding_nodes_are_never_accepted():
    # the chain is padded to 6 nodes; padding nodes carry the argmax token but are on no path
    chain = build_tree([[0]])
    acc = accept([[1, 2, 3, 3, 3, 3], [7, 3, 4, 5, 6, 8]], [[2, 3, 3, 3, 3, 3], [9] * 6], (chain, TREE))
    assert acc.count.tolist() == [2, 1]
    assert acc.tokens[0, :2].tolist() == [2, 3]


def test_root_only_trees_emit_the_root_argmax():
    root = build_tree([])
    out = accept([[4], [9]], [[7], [2]], (root, root))
    assert out.count.tolist() == [1, 1]
    assert out.tokens.tolist() == [[7], [2]] and out.nodes.tolist() == [[0], [0]]
