"""Sampling: warping, the draws, exact and typical acceptance with hand-built distributions; on the
bundled model, seeded reproducibility (speculative == standard) and the joint distribution of the
first tokens against the model's own, computed with Hugging Face's warpers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.decode import Engine
from engine.messages import Request, SamplingParams
from engine.sampling import Sampled, Uniforms, accept, inverse_cdf, typical_accept, warp
from engine.tree import ROOT, build_tree, stack_trees

# root 0; node 1 = [0], node 2 = [1], node 3 = [0, 0]
TREE = build_tree([[0], [1], [0, 0]])
V = 8


def rows(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def probs_to_logits(probs: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(probs)
    return torch.where(p > 0, p.log(), torch.full_like(p, -1e9))


# ---- warping -------------------------------------------------------------------------------------


def test_warp_without_filters_is_the_tempered_softmax():
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0))
    out = warp(logits, rows(1.0, 0.5), rows(V, V, dtype=torch.long), rows(1.0, 1.0))
    assert torch.allclose(out[0], logits[0].softmax(-1), atol=1e-6)
    assert torch.allclose(out[1], (logits[1] / 0.5).softmax(-1), atol=1e-6)


def test_top_k_keeps_the_most_likely_and_breaks_ties_by_lower_id():
    logits = torch.tensor([[[0.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]]])
    out = warp(logits, rows(1.0), rows(2, dtype=torch.long), rows(1.0))
    assert out[0, 0].tolist() == [0.0, 0.5, 0.5, 0, 0, 0, 0, 0]
    one = warp(logits, rows(1.0), rows(1, dtype=torch.long), rows(1.0))
    assert one[0, 0].argmax().item() == logits[0, 0].argmax().item() == 1 and one[0, 0, 1] == 1.0


def test_top_k_1_samples_the_argmax_whatever_the_draw():
    logits = torch.randn(4, 1, V, generator=torch.Generator().manual_seed(1))
    probs = warp(logits, rows(1.0, 1.0, 1.0, 1.0), rows(1, 1, 1, 1, dtype=torch.long), rows(1.0, 1.0, 1.0, 1.0))
    for u in (0.0, 0.3, 0.999999):
        assert inverse_cdf(probs, torch.full((4, 1), u)).tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_it_after_top_k():
    logits = probs_to_logits([[[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0]]])
    kept = lambda top_k, top_p: (warp(logits, rows(1.0), rows(top_k, dtype=torch.long), rows(top_p))[0, 0] > 0).nonzero().flatten().tolist()
    assert kept(V, 0.35) == [0]
    assert kept(V, 0.5) == [0, 1]
    assert kept(V, 0.75) == [0, 1, 2]
    assert kept(V, 1.0) == [0, 1, 2, 3]
    assert kept(2, 0.55) == [0]  # after top_k = 2 the first token holds 4/7 of the mass
    assert kept(2, 0.6) == [0, 1]
    out = warp(logits, rows(1.0), rows(V, dtype=torch.long), rows(0.5))[0, 0]
    assert torch.allclose(out[:2], torch.tensor([4 / 7, 3 / 7]))


def test_warp_matches_hugging_face_warpers():
    logits = torch.randn(3, V * 8, generator=torch.Generator().manual_seed(2)) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8), (0.5, 20, 0.6)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        ref = TopKLogitsWarper(top_k)(None, ref) if top_k else ref
        ref = TopPLogitsWarper(top_p)(None, ref) if top_p < 1 else ref
        n = len(logits)
        ours = warp(logits, torch.full((n,), temperature), torch.full((n,), top_k or V * 8), torch.full((n,), top_p))
        assert torch.allclose(ours, ref.softmax(-1), atol=1e-6), (temperature, top_k, top_p)


def test_inverse_cdf_follows_token_order_and_skips_impossible_tokens():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0]]).expand(7, 5)
    u = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.7, 0.99, 1 - 1e-9])
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]


def test_uniforms_are_one_stream_whatever_is_peeked():
    a, b = Uniforms(7), Uniforms(7)
    seen = []
    for n in (3, 1, 70, 2):
        a.peek(n + 5)
        seen += a.peek(n).tolist()
        a.advance(n)
    assert seen == b.peek(76).tolist()
    assert Uniforms(8).peek(4).tolist() != b.peek(4).tolist()


# ---- exact acceptance with hand-built distributions ----------------------------------------------


def exact(tokens: list[int], probs: list[list[float]], uniforms: list[float], tree=TREE):
    """One sequence: node tokens, each node's distribution (already warped: temperature 1, no filters)."""
    step = stack_trees((tree,), torch.device("cpu"))
    sampled = Sampled(rows(0, dtype=torch.long), rows(1.0), rows(V, dtype=torch.long), rows(1.0),
                      torch.tensor([uniforms]), rows(False, dtype=torch.bool), rows(0.09), rows(0.3))
    return accept(torch.tensor([tokens]), probs_to_logits([probs]), step.depths, step.retrieve, sampled)


ROOT_P = [0, 0, 0, 0.5, 0.25, 0.25, 0, 0]  # the root's children carry 3 (node 1) and 4 (node 2)
NODE1_P = [0, 0, 0, 0, 0, 0, 0.5, 0.5]  # node 3 (under node 1) carries 6
NODE3_P = [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0]
UNIFORM = [1 / V] * V
TOKENS = [2, 3, 4, 6]


def test_exact_descends_while_the_draw_is_a_child():
    acc = exact(TOKENS, [ROOT_P, NODE1_P, UNIFORM, NODE3_P], [0.2, 0.3, 0.6])
    assert acc.count.tolist() == [3]  # root, node 1 (3), node 3 (6)
    assert acc.nodes[0].tolist() == [0, 1, 3]
    assert acc.tokens[0].tolist() == [3, 6, 2]  # then the bonus: NODE3_P at u = 0.6


def test_exact_takes_the_other_branch_and_stops_below_it():
    acc = exact(TOKENS, [ROOT_P, NODE1_P, UNIFORM, NODE3_P], [0.6, 0.1, 0.9])
    assert acc.count.tolist() == [2] and acc.nodes[0, :2].tolist() == [0, 2]
    assert acc.tokens[0, :2].tolist() == [4, 0]  # node 2 draws with the step's 2nd number: UNIFORM at 0.1


def test_exact_emits_a_draw_that_no_child_carries():
    acc = exact(TOKENS, [ROOT_P, NODE1_P, UNIFORM, NODE3_P], [0.9, 0.1, 0.1])
    assert acc.count.tolist() == [1] and acc.tokens[0, 0].item() == 5


def test_exact_rejects_below_an_accepted_node():
    acc = exact(TOKENS, [ROOT_P, NODE1_P, UNIFORM, NODE3_P], [0.0, 0.7, 0.5])
    assert acc.count.tolist() == [2] and acc.tokens[0, :2].tolist() == [3, 7]  # 7 drawn, node 3 carries 6
    acc = exact([2, 3, 4, 7], [ROOT_P, NODE1_P, UNIFORM, NODE3_P], [0.0, 0.2, 0.5])
    assert acc.count.tolist() == [2] and acc.tokens[0, :2].tolist() == [3, 6]  # 6 drawn, node 3 carries 7


# ---- typical acceptance --------------------------------------------------------------------------


def typical(tokens, probs, u, epsilon=0.09, delta=0.3):
    step = stack_trees((TREE,), torch.device("cpu"))
    return typical_accept(torch.tensor([tokens]), torch.tensor([probs]), step.retrieve, rows(epsilon), rows(delta),
                          rows(u))


def test_typical_accepts_tokens_above_the_entropy_threshold():
    peaked = [0, 0, 0, 0.9, 0.05, 0.05, 0, 0]  # entropy 0.39: threshold min(0.09, 0.3 * e^-0.39 = 0.20) = 0.09
    acc = typical(TOKENS, [peaked, NODE1_P, UNIFORM, NODE3_P], u=0.99)
    # node 1 (3: p 0.9) accepted, node 3 (6: p 0.5 > min(0.09, 0.3 / 2)) accepted, bonus from NODE3_P at 0.99
    assert acc.count.tolist() == [3] and acc.tokens[0].tolist() == [3, 6, 3]


def test_typical_rejects_below_the_threshold_and_samples_the_bonus():
    flat = [0.02, 0.02, 0.02, 0.06, 0.08, 0.8, 0, 0]  # 3 (0.06) and 4 (0.08) are under min(0.09, ...)
    acc = typical(TOKENS, [flat, NODE1_P, UNIFORM, NODE3_P], u=0.0)
    assert acc.count.tolist() == [1] and acc.tokens[0, 0].item() == 0
    acc = typical(TOKENS, [flat, NODE1_P, UNIFORM, NODE3_P], u=0.5)
    assert acc.tokens[0, 0].item() == 5


def test_typical_breaks_ties_by_summed_log_probability():
    both = [0, 0, 0, 0.3, 0.6, 0.1, 0, 0]  # 3 and 4 both accepted at depth 1
    no_six = [0.5, 0.5, 0, 0, 0, 0, 0, 0]  # below node 1, 6 is rejected: both paths accept one node
    acc = typical(TOKENS, [both, no_six, UNIFORM, NODE3_P], u=0.0)
    assert acc.count.tolist() == [2] and acc.nodes[0, :2].tolist() == [0, 2]  # 4 (0.6) beats 3 (0.3)
    assert acc.tokens[0, :2].tolist() == [4, 0]


def test_typical_lower_epsilon_accepts_more_and_the_longest_path_wins():
    flat = [0.02, 0.02, 0.02, 0.06, 0.08, 0.8, 0, 0]
    acc = typical(TOKENS, [flat, NODE1_P, UNIFORM, NODE3_P], u=0.0, epsilon=0.05)
    # both 3 (0.06) and 4 (0.08) pass now; under 3, 6 passes too: the longer path beats 4's higher p
    assert acc.count.tolist() == [3] and acc.nodes[0].tolist() == [0, 1, 3]


# ---- on the bundled model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_prompts(bundled):
    _, tokenizer = bundled
    texts = ["def read_config(path):", "import numpy as np\n", "class Node:\n    def __init__(self):",
             "for i in range(10):\n", "    return self.", "# Copyright", "if __name__ ==", "x = ["]
    return [tokenizer(t)["input_ids"] for t in texts]


def sampled_requests(prompts, seeds, tag="", **params):
    return [Request(f"{tag}{s}", prompts[s % len(prompts)], max_new_tokens=16, ignore_eos=True,
                    sampling=SamplingParams(temperature=0.7, top_p=0.95, seed=s, **params)) for s in seeds]


def accepted_per_step(seqs) -> float:
    return sum(s.decode_tokens for s in seqs) / sum(s.decode_steps for s in seqs)


def test_seeded_speculative_sampling_equals_standard_sampling(bundled, bundled_tree, sampling_prompts):
    model, tokenizer = bundled
    seeds = range(50)
    standard = Engine(model, tokenizer, tree=ROOT, max_batch_size=1)
    speculative = Engine(model, tokenizer, tree=bundled_tree, max_batch_size=16)
    reference = [standard.generate([r])[0].tokens for r in sampled_requests(sampling_prompts, seeds)]
    alone = [speculative.generate([r])[0] for r in sampled_requests(sampling_prompts, seeds)]
    greedy = [Request(f"g{i}", p, max_new_tokens=12) for i, p in enumerate(sampling_prompts)]
    others = sampled_requests(sampling_prompts, range(100, 110), "t", acceptance="typical")
    mixed = speculative.generate(sampled_requests(sampling_prompts, seeds) + greedy + others)
    assert [s.tokens for s in mixed[50:58]] == [s.tokens for s in speculative.generate(greedy)]
    mixed = mixed[:50]
    same_alone = sum(s.tokens == ref for s, ref in zip(alone, reference))
    same_mixed = sum(s.tokens == ref for s, ref in zip(mixed, reference))
    print(f"seeded speculative == standard: alone {same_alone}/50, in a mixed batch {same_mixed}/50")
    assert same_alone >= 49 and same_mixed >= 49
    assert accepted_per_step(alone) > 1.2  # speculation did accept drafts
    assert len({tuple(r) for r in reference}) >= 45  # the seeds give different samples


def chi_square(counts: dict[tuple, int], probs: dict[tuple, float]) -> tuple[float, int, float]:
    """Pearson's statistic of observed counts against expected probabilities, degrees of freedom, p-value."""
    n = sum(counts.values())
    cells = [c for c in probs if probs[c] > 0]
    assert set(counts) <= set(cells), "a sample the model gives probability 0"
    stat = sum((counts.get(c, 0) - n * probs[c]) ** 2 / (n * probs[c]) for c in cells)
    df = len(cells) - 1
    p_value = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return stat, df, float(p_value)


@pytest.fixture(scope="module")
def joint_reference(bundled, sampling_prompts):
    """The model's joint distribution of its first three tokens under temperature 0.9 and top_k 3,
    from its logits and Hugging Face's warpers."""
    model, _ = bundled
    prompt = sampling_prompts[0]
    warpers = [TemperatureLogitsWarper(0.9), TopKLogitsWarper(3)]

    def next_probs(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model.model(torch.tensor([prompt + prefix])).logits[:, -1]
        for w in warpers:
            logits = w(None, logits)
        return logits.softmax(-1)[0]

    joint: dict[tuple, float] = {}
    first = next_probs([])
    for a in first.nonzero().flatten().tolist():
        second = next_probs([a])
        for b in second.nonzero().flatten().tolist():
            third = next_probs([a, b])
            for c in third.nonzero().flatten().tolist():
                joint[(a, b, c)] = float(first[a] * second[b] * third[c])
    return prompt, joint


def sample_joint(bundled, tree, prompt, seeds, acceptance="exact"):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=64)
    requests = [Request(str(s), prompt, max_new_tokens=3, ignore_eos=True,
                        sampling=SamplingParams(temperature=0.9, top_k=3, seed=s, acceptance=acceptance))
                for s in seeds]
    seqs = engine.generate(requests)
    counts: dict[tuple, int] = {}
    for s in seqs:
        counts[tuple(s.tokens)] = counts.get(tuple(s.tokens), 0) + 1
    return counts, accepted_per_step(seqs)


def test_exact_speculative_sampling_has_the_models_distribution(bundled, bundled_tree, joint_reference):
    prompt, joint = joint_reference
    assert 8 <= len(joint) <= 27 and abs(sum(joint.values()) - 1) < 1e-4 and max(joint.values()) < 0.9
    n = 2000
    spec, per_step = sample_joint(bundled, bundled_tree, prompt, range(n))
    std, _ = sample_joint(bundled, ROOT, prompt, range(n, 2 * n))
    typ, typical_per_step = sample_joint(bundled, bundled_tree, prompt, range(n), "typical")
    results = {name: chi_square(c, joint) for name, c in (("speculative", spec), ("standard", std), ("typical", typ))}
    for name, (stat, df, p) in results.items():
        print(f"{name}: chi-square {stat:.1f}, {df} degrees of freedom, p = {p:.3g}")
    print(f"accepted tokens per step: exact {per_step:.2f}, typical {typical_per_step:.2f}")
    assert per_step > 1.2  # drafts were accepted, so the test says something about acceptance
    assert results["speculative"][2] > 1e-3 and results["standard"][2] > 1e-3
    assert results["typical"][2] < 1e-6  # typical acceptance is not distribution-preserving, and the test sees it


def test_top_k_1_is_greedy(bundled, bundled_tree, sampling_prompts):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, tree=bundled_tree, max_batch_size=8)
    sampled = engine.generate([Request(str(i), p, max_new_tokens=24, sampling=SamplingParams(0.7, top_k=1, seed=i))
                               for i, p in enumerate(sampling_prompts)])
    greedy = engine.generate([Request(str(i), p, max_new_tokens=24) for i, p in enumerate(sampling_prompts)])
    assert [s.tokens for s in sampled] == [g.tokens for g in greedy]
