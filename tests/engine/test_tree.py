"""Tree buffers built from lists of paths."""

from __future__ import annotations

import json

import pytest
import torch

from engine.tree import PRESETS, build_tree, load_tree, preset, stack_trees


def test_buffers_of_a_small_tree():
    tree = build_tree([[1], [0], [0, 0], [0, 1]], "t")
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1))  # sorted by depth, then path
    assert tree.num_nodes == 5 and tree.depth == 2 and tree.topk == 2
    assert tree.depths.tolist() == [0, 1, 1, 2, 2]
    assert tree.heads.tolist() == [0, 0, 0, 1, 1]
    assert tree.ranks.tolist() == [0, 0, 1, 0, 1]
    assert tree.mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert tree.retrieve.tolist() == [[0, 2, -1], [0, 1, 3], [0, 1, 4]]


def test_root_only_tree_is_standard_decoding():
    tree = preset("root")
    assert tree.num_nodes == 1 and tree.depth == 0 and tree.topk == 0
    assert tree.retrieve.tolist() == [[0]]


@pytest.mark.parametrize("paths, message", [([[0, 0]], "no parent"), ([[0], [0]], "repeats"), ([[-1]], ">= 0")])
def test_invalid_trees_are_refused(paths, message):
    with pytest.raises(ValueError, match=message):
        build_tree(paths)


def test_presets():
    assert preset("mc_sim_7b_63").num_nodes == 64
    assert [preset(f"chain{d}").num_nodes for d in range(1, 5)] == [2, 3, 4, 5]
    assert preset("tree15").num_nodes == 16 and preset("tree15").depth == 3
    depths = preset("mc_sim_7b_63").depths.tolist()
    assert [depths.count(d) for d in range(1, 5)] == [10, 28, 23, 2]
    assert all(preset(name).depth <= 4 for name in PRESETS)
    with pytest.raises(ValueError, match="unknown tree preset"):
        preset("nope")


def test_tree_from_a_json_file(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps([[0], [0, 0], [1]]))
    tree = load_tree(str(tmp_path / "mine.json"))
    assert tree.name == "mine" and tree.num_nodes == 4


def test_stacked_trees_are_padded():
    step = stack_trees((preset("chain2"), preset("root")), torch.device("cpu"))
    assert step.num_nodes == 3
    assert step.mask[1].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding sees itself only
    assert step.retrieve.tolist() == [[[0, 1, 2]], [[0, -1, -1]]]
    assert stack_trees((preset("chain2"), preset("root")), torch.device("cpu")) is step  # cached
