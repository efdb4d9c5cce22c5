"""Nothing one request brings can fail a batched step for the others: any schema-valid mix of
sampling parameters steps (a property test), and a sequence whose step still fails is isolated:
the forward is retried for each sequence alone, only the failing one ends (finish reason "error"),
and its neighbours' output is exactly what it would have been."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.decode import Engine
from engine.messages import FAILED, Request, SamplingParams
from engine.tree import preset
from server.generation import Limits, engine_requests
from server.protocol import CompletionRequest

POISON = 7  # a prompt that starts with this token meets the injected fault


def poisoned(seqs) -> bool:
    return any(s.request.prompt_ids[0] == POISON for s in seqs)


class FaultyEngine(Engine):
    """A forward with a POISON sequence raises after the model has run (its K/V written): in the
    prefill's first-token choice, or in a decode step's acceptance, as a bug met by one request's
    parameters would."""

    fault = "step"

    def _first_tokens(self, seqs, logits):
        if self.fault == "prefill" and poisoned(seqs):
            raise RuntimeError("injected prefill fault")
        return super()._first_tokens(seqs, logits)

    def _accept(self, seqs, tokens, logits, trees):
        if self.fault == "step" and tokens.shape[1] > 1 and poisoned(seqs):
            raise RuntimeError("injected step fault")
        return super()._accept(seqs, tokens, logits, trees)


def engine_of(toy, cls=Engine, batch=8) -> Engine:
    model, tokenizer = toy
    return cls(model, tokenizer, tree=preset("tree15"), max_batch_size=batch)


@pytest.mark.parametrize("fault", ["step", "prefill"])
def test_a_sequence_that_fails_its_step_fails_alone(toy, prompts, hf_greedy, fault, caplog):
    engine = engine_of(toy, FaultyEngine)
    engine.fault = fault
    reqs = [Request(str(i), p, max_new_tokens=24) for i, p in enumerate(prompts[:5])]
    sampled = Request("sampled", prompts[5], max_new_tokens=24, sampling=SamplingParams(0.8, top_k=40, seed=3))
    poison = Request("poison", [POISON, *prompts[6][1:]], max_new_tokens=24)
    results = engine.generate([*reqs[:2], poison, *reqs[2:], sampled])
    by_id = {s.request.id: s for s in results}
    assert by_id["poison"].finish_reason == FAILED
    for r in reqs:
        assert by_id[r.id].tokens == hf_greedy(r.prompt_ids, 24), r.id
    alone = engine_of(toy).generate([sampled])[0]
    assert by_id["sampled"].tokens == alone.tokens  # its draws were not used up by the failed attempt
    assert f"failed in its {fault}" in caplog.text


def test_a_lone_sequence_that_fails_ends_with_an_error_and_the_batch_goes_on(toy, prompts, hf_greedy):
    engine = engine_of(toy, FaultyEngine)
    batch = engine.new_batch()
    engine.admit(batch, [Request("poison", [POISON, *prompts[1][1:]], max_new_tokens=8)])
    assert engine.step(batch) == [] and batch.seqs[0].finish_reason == FAILED
    assert [s.request.id for s in engine.filter(batch)] == ["poison"]
    later = engine.generate([Request("later", prompts[2], max_new_tokens=8)])[0]
    assert later.tokens == hf_greedy(prompts[2], 8)


# ---- any schema-valid mix of sampling parameters steps ---------------------------------------------

TINY = [1e-46, 1e-39, 1e-30, 1e-6]
sampling_fields = st.fixed_dictionaries({
    "temperature": st.one_of(st.sampled_from([0.0, 0.8, 2.0, 1e-5, 9.9e-6, *TINY]), st.floats(0, 2)),
    "top_k": st.one_of(st.none(), st.sampled_from([1, 2, 2**70, 10**5]), st.integers(1, 2**64)),
}, optional={
    "top_p": st.one_of(st.sampled_from([1.0, *TINY]), st.floats(0, 1, exclude_min=True)),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "acceptance": st.sampled_from(["exact", "typical"]),
    "typical_epsilon": st.one_of(st.sampled_from(TINY), st.floats(0, 1, exclude_min=True)),
    "typical_delta": st.one_of(st.sampled_from(TINY), st.floats(0, 1, exclude_min=True)),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "echo": st.booleans(),
    "speculative": st.booleans(),
    "n": st.integers(1, 2),
})


@pytest.fixture(scope="module")
def mixed_engine(toy):
    model, tokenizer = toy
    return engine_of(toy, batch=8), Limits(256, 16, 8, model.config.vocab_size, True, 10**6)


@given(bodies=st.lists(sampling_fields, min_size=2, max_size=4))
@example(bodies=[{"temperature": 0.8, "top_k": 2**70}, {}])  # the probe's two reproductions
@example(bodies=[{"temperature": 0.8, "top_k": 10**5}, {"temperature": 0.8, "top_k": 40}, {}])
@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_any_mix_of_valid_sampling_parameters_steps_in_one_batch(mixed_engine, prompts, bodies):
    engine, limits = mixed_engine
    reqs = []
    for i, fields in enumerate(bodies):
        body = CompletionRequest.model_validate({"prompt": prompts[i], "max_tokens": 6, **fields})
        reqs += engine_requests(body, [("", prompts[i])], body.max_tokens, limits)
    greedy = Request("greedy bystander", prompts[7], max_new_tokens=6)
    results = engine.generate([*reqs, greedy])
    assert [s.finish_reason for s in results if s.finish_reason not in ("length", "stop")] == []
    vocab = limits.vocab_size
    assert all(0 <= t < vocab for s in results for t in s.tokens)


@pytest.mark.parametrize("fields", [{"temperature": 1e-39, "seed": 1}, {"temperature": 1e-46}, {"temperature": 9e-6},
                                    {"temperature": 0.7, "top_p": 1e-46, "seed": 2}])
def test_a_vanishing_temperature_or_top_p_decodes_greedily(mixed_engine, prompts, hf_greedy, fields):
    """Not the NaN of a division that overflows fp32 (which emitted the last token of the vocabulary)."""
    engine, limits = mixed_engine
    body = CompletionRequest.model_validate({"prompt": prompts[3], "max_tokens": 12, **fields})
    [seq] = engine.generate(engine_requests(body, [("", prompts[3])], body.max_tokens, limits))
    assert seq.tokens == hf_greedy(prompts[3], 12)
