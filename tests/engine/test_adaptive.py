"""Adaptive speculation: the cost table, the nested family of trees, the acceptance counts, the choice
of tree for a batch with fixed tables (hand-computed crossovers), exact decoding while the tree
changes, the measured table cached, and the service showing the tree in use."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from app import create_app
from engine import calibration
from engine.adaptive import CostTable, TreeChooser, nested_family
from engine.calibration import cost_table
from engine.decode import Engine
from engine.messages import Request
from engine.sampling import Accepted
from engine.tree import ROOT, build_tree, preset
from tests.http_helpers import wait_for

CHAIN4 = build_tree([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "chain4")
FLAT_THEN_STEEP = CostTable((1, 64), (1, 5), ((1.0, 1.0), (1.0, 5.0)))  # batch 1: free; 64: 1 s per token


def chooser_with(tree, probabilities: dict, costs: CostTable) -> TreeChooser:
    """A chooser whose acceptance counts say exactly these probabilities."""
    chooser = TreeChooser(tree, costs)
    chooser.offered = {p: 1000.0 for p in tree.paths}
    chooser.accepted = {p: 1000.0 * probabilities[p] for p in tree.paths}
    return chooser


def test_the_cost_table_interpolates_linearly_and_is_flat_beyond_its_ends():
    table = CostTable((1, 8), (1, 11), ((1.0, 2.0), (3.0, 6.0)))
    assert table.predict(1, 1) == 1.0 and table.predict(8, 11) == 6.0
    assert table.predict(1, 6) == 1.5 and table.predict(4.5, 1) == 2.0 and table.predict(4.5, 6) == 3.0
    assert table.predict(0, 0) == 1.0 and table.predict(100, 100) == 6.0


def test_the_family_is_nested_trees_from_root_only_to_the_whole_tree():
    tree = preset("mc_sim_7b_63")
    family = nested_family(tree)
    assert [t.num_nodes for t in family] == [1, 2, 3, 5, 9, 17, 33, 64]
    assert family[0] is ROOT and set(family[-1].paths) == set(tree.paths)
    for small, big in zip(family[1:], family[2:]):
        assert set(small.paths) < set(big.paths)
    # by the prior 0.5 / (rank + 1) per level, ties to the shallower node: (0), then (1) and (0, 0)
    assert family[1].paths == ((0,),) and family[2].paths == ((0,), (1,))
    assert set(family[3].paths) == {(0,), (1,), (0, 0), (2,)}


def test_the_choice_crosses_over_where_the_cost_model_says():
    """Chain of 4 with P(accepted) 0.8, 0.6, 0.4, 0.2: expected tokens 1, 1.8, 2.4, 3.0 for 1, 2, 3 and
    5 tokens verified. Step cost 1 + (T - 1) s with s = (B - 1) / 63. A bigger tree wins when it
    promises 5% more (MARGIN): 2 tokens over root while 1.8 / (1 + s) > 1.05 (s < 0.714, B <= 45), 3
    over 2 while 2.4 (1 + s) > 1.89 (1 + 2 s) (s < 0.370, B <= 24), 5 over 3 while 3 (1 + 2 s) >
    2.52 (1 + 4 s) (s < 0.118, B <= 8); without the margin the crossovers would be B = 11, 32, 51."""
    probabilities = {(0,): 0.8, (0, 0): 0.6, (0, 0, 0): 0.4, (0, 0, 0, 0): 0.2}
    chooser = chooser_with(CHAIN4, probabilities, FLAT_THEN_STEEP)
    assert [round(chooser.expected_tokens(t), 6) for t in chooser.family] == [1.0, 1.8, 2.4, 3.0]
    sizes = {b: chooser.choose(b, 0).num_nodes for b in (1, 8, 9, 24, 25, 45, 46, 64)}
    assert sizes == {1: 5, 8: 5, 9: 3, 24: 3, 25: 2, 45: 2, 46: 1, 64: 1}
    assert chooser.choose(0, 5) is ROOT  # standard requests only: nothing to speculate for
    # 1 speculative and 63 standard sequences at batch 64: (1.8 + 63) / 2 < 64 / 1
    assert chooser.choose(1, 63) is ROOT and chooser.in_use is ROOT


def test_exploring_a_costly_tree_takes_at_most_its_share_of_the_time():
    """At batch 8 root only wins (P(node) 0.1) and the 2-node step costs 1.9x: exploring it every 16th step
    would spend 5% of the time on it, so it is verified every 45th step (0.9 / 45 = 2%); at batch 1,
    where it costs 1.2x, every 16th."""
    chain1 = build_tree([[0]], "chain1")
    costs = CostTable((1, 8), (1, 2), ((1.0, 1.2), (1.0, 1.9)))
    for batch, every in ((8, 45), (1, 16)):
        chooser = chooser_with(chain1, {(0,): 0.1}, costs)
        explored = [i for i in range(1, 201) if chooser.choose(batch, 0).num_nodes == 2]
        assert explored == list(range(every, 201, every))


def test_acceptance_is_counted_per_node_from_each_step():
    chooser = TreeChooser(CHAIN4, FLAT_THEN_STEEP)
    before_offered, before_accepted = dict(chooser.offered), dict(chooser.accepted)
    whole = chooser.family[-1]
    accepted = Accepted(nodes=torch.tensor([[0, 1, 2, -1, -1], [0, -1, -1, -1, -1], [0, -1, -1, -1, -1]]),
                        count=torch.tensor([3, 1, 1]), tokens=torch.zeros(3, 5, dtype=torch.long))
    chooser.record([whole, whole, ROOT], accepted)
    assert {p: chooser.offered[p] - before_offered[p] for p in CHAIN4.paths} == dict.fromkeys(CHAIN4.paths, 2)
    assert {p: chooser.accepted[p] - before_accepted[p] for p in CHAIN4.paths} == {
        (0,): 1, (0, 0): 1, (0, 0, 0): 0, (0, 0, 0, 0): 0}


def test_decoding_stays_exact_while_the_tree_follows_the_batch(toy, prompts, hf_greedy):
    """Eight requests of different lengths: the batch shrinks as they finish, and with costs that are
    flat at batch 1 and steep at 8 the tree grows from root only to the whole tree on the way."""
    model, tokenizer = toy
    tree = preset("tree15")
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=8)
    family = nested_family(tree)
    tokens = tuple(t.num_nodes for t in family)
    engine.chooser = TreeChooser(tree, CostTable((1, 8), tokens, (tuple(1.0 for _ in tokens), tokens)))
    requests = [Request(str(i), p, max_new_tokens=8 + 6 * i) for i, p in enumerate(prompts)]
    used, done = set(), {}
    for _, finished in engine.run(requests):
        used.add(engine.chooser.in_use.num_nodes)
        done |= {s.request.id: s for s in finished}
    for r in requests:
        assert done[r.id].tokens == hf_greedy(r.prompt_ids, r.max_new_tokens), r.id
    assert 1 in used and tree.num_nodes in used


def test_step_costs_are_measured_once_then_read_from_the_cache(toy, tmp_path, monkeypatch):
    model, tokenizer = toy
    tree = preset("tree15")
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=4)
    family = nested_family(tree)
    key = {"model": "toy", "device": "cpu", "dtype": "float32"}
    measured = cost_table(engine, family, key, tmp_path)
    assert measured.batch_sizes == (1, 2, 4) and measured.tokens == tuple(t.num_nodes for t in family)
    assert all(s > 0 for row in measured.seconds for s in row)
    assert len(list(tmp_path.glob("costs-*.json"))) == 2  # the table and its key

    def no_measuring(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "calibrate", no_measuring)
    assert cost_table(engine, family, key, tmp_path) == measured
    with pytest.raises(AssertionError, match="measured again"):
        cost_table(engine, family, {**key, "dtype": "float16"}, tmp_path)  # another key: another table


def test_the_service_shows_the_tree_in_use_and_speculates_only_where_it_pays(settings, wait_ready, tmp_path):
    """A table where every token verified costs a whole step: speculation never pays, so speculative
    requests decode root-only (1.0 token per step) with the same output; /info and /metrics say so."""
    steep = tmp_path / "steep.json"
    CostTable((1, 64), (1, 64), ((1.0, 64.0), (1.0, 64.0))).save(steep)
    body = {"prompt": "def read_config(path):", "max_tokens": 24}
    with TestClient(create_app(settings.model_copy(update={"cost_table": str(steep)}))) as c:
        wait_ready(c.get)
        assert c.get("/info").json()["adaptive_tree"] is True
        speculative = c.post("/v1/completions", json=body).json()
        standard = c.post("/v1/completions", json={**body, "speculative": False}).json()
        assert speculative["choices"][0]["text"] == standard["choices"][0]["text"]
        assert speculative["metrics"]["accepted_tokens_per_step"] == 1.0
        wait_for(lambda: c.get("/info").json()["tree_in_use"] is not None)
        assert c.get("/info").json()["tree_in_use"]["nodes"] == 1
        assert "medusa_tree_nodes 1.0" in c.get("/metrics").text


def test_speculation_comes_back_after_a_low_acceptance_phase(settings, wait_ready, tmp_path):
    """Each token verified costs 0.3 of a step: the 2-node tree pays while its node is accepted more
    than 30% of the time. Hot sampling accepts little and the tree falls to root only; greedy code
    then accepts a lot, and the exploration steps (a bigger tree every 16th step) bring it back."""
    costly = tmp_path / "costly.json"
    CostTable((1, 64), (1, 64), ((1.0, 19.9), (1.0, 19.9))).save(costly)
    with TestClient(create_app(settings.model_copy(update={"cost_table": str(costly)}))) as c:
        wait_ready(c.get)

        for i in range(8):
            hot = c.post("/v1/completions", json={"prompt": "def", "max_tokens": 32, "temperature": 1.5, "seed": i})
        assert hot.json()["metrics"]["accepted_tokens_per_step"] < 1.1  # root only, but for exploration
        greedy = {"prompt": "class Config:\n    def __init__(self, **kwargs):\n", "max_tokens": 48}
        for _ in range(12):  # exploration alone (1 step in 16) would give at most 1.06 tokens per step
            per_step = c.post("/v1/completions", json=greedy).json()["metrics"]["accepted_tokens_per_step"]
            if per_step > 1.3:
                break
        assert per_step > 1.3


def test_the_whole_tree_where_verifying_is_free(http):
    """The session's server has a flat table (conftest): always the whole tree."""
    http.post("/v1/completions", json={"prompt": "import os\n", "max_tokens": 8})
    info = http.get("/info").json()
    assert info["adaptive_tree"] is True and info["tree_in_use"] == info["tree"]
    assert f'medusa_speculative_steps_total{{nodes="{info["tree"]["nodes"]}"}}' in http.get("/metrics").text


def test_the_gpu_projection_script_prints_a_tree_per_batch_size(capsys):
    from bench.adaptive_projection import main

    main(["--max-tokens", "4"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line[:2] == "| " and line[2].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8, 16, 24, 32]
    nodes, ratios = [int(r[1]) for r in rows], [float(r[4].strip().rstrip("x")) for r in rows]
    assert nodes == sorted(nodes, reverse=True) and nodes[0] > nodes[-1]  # the tree shrinks as the batch grows
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1.0  # speculation pays less, but still pays


def test_a_cost_table_that_makes_no_sense_is_refused():
    with pytest.raises(ValueError, match="more than 0 seconds"):
        CostTable((1,), (1, 2), ((0.01, 0.0),))
    with pytest.raises(ValueError, match="increasing"):
        CostTable((8, 1), (1,), ((0.01,), (0.01,)))
    with pytest.raises(ValueError, match="a row per batch size"):
        CostTable((1, 8), (1,), ((0.01,),))


def test_a_context_too_short_to_time_the_tree_is_a_clear_error(toy):
    model, tokenizer = toy
    engine = Engine(model, tokenizer, tree=CHAIN4, max_batch_size=1, max_context=16)
    with pytest.raises(ValueError, match="too short to time"):
        calibration.calibrate(engine, nested_family(CHAIN4))
    short = Engine(model, tokenizer, tree=CHAIN4, max_batch_size=2, max_context=32)  # room for 4 steps, not 9
    assert calibration.calibrate(short, nested_family(CHAIN4)).batch_sizes == (1, 2)


def test_a_measured_table_never_says_a_bigger_step_is_cheaper():
    noisy = [[1.0, 3.0, 2.0, 4.0],   # batch 1: 3 tokens timed cheaper than 2
             [0.5, 2.5, 5.0, 4.5]]   # batch 2: cheaper than batch 1 at 1 and 2 tokens, 5 cheaper than 3
    assert calibration.non_decreasing(noisy) == ((1.0, 3.0, 3.0, 4.0), (1.0, 3.0, 5.0, 5.0))
