"""Incremental detokenisation and stop strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer, StopMatcher, TextStream
from server.generation import piece_texts

TEXT = "naïve café — 東京 🚀 déjà vu\n    return x  # ok"


def deltas(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, [])
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_byte_level_deltas_add_up_and_hold_partial_characters(toy):
    _, tokenizer = toy
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    out = deltas(tokenizer, ids)
    assert "".join(out) == TEXT
    assert "" in out[:-1]  # some token ended inside a multi-byte character and was held back
    assert all("\ufffd" not in d for d in out)


@pytest.fixture(scope="module")
def sentencepiece_style():
    """A Metaspace ('▁' for spaces) tokenizer: decoding a token alone drops its leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_sentencepiece_style_spaces_are_kept(sentencepiece_style):
    text = "the lazy dog jumps over the quick fox"
    ids = sentencepiece_style(text, add_special_tokens=False)["input_ids"]
    prompt, generated = ids[:3], ids[3:]
    naive = "".join(sentencepiece_style.decode([t]) for t in generated)
    assert sentencepiece_style.decode(prompt) + naive != text  # the hazard: tokens decoded alone lose spaces
    detok = IncrementalDetokenizer(sentencepiece_style, prompt)
    streamed = "".join(detok.push(t) for t in generated)
    assert sentencepiece_style.decode(prompt) + streamed == text


def feed_all(stops, pieces):
    matcher = StopMatcher(tuple(stops))
    out, stopped = [], False
    for piece in pieces:
        released, stopped = matcher.feed(piece)
        out.append(released)
        if stopped:
            break
    return out, stopped, matcher


def test_stop_string_straddling_deltas_is_cut_and_never_released():
    out, stopped, _ = feed_all(["END"], ["abc E", "N", "Dxyz"])
    assert stopped and "".join(out) == "abc "
    assert out == ["abc ", "", ""]  # "E" and "EN" were held back: they might start the stop string


def test_held_back_text_is_released_when_it_is_not_a_stop():
    out, stopped, _ = feed_all(["END"], ["abc E", "Nx", "y"])
    assert not stopped and out == ["abc ", "ENx", "y"]


def test_earliest_of_several_stop_strings_wins():
    out, stopped, _ = feed_all(["world", "lo w"], ["hello world"])
    assert stopped and out == ["hel"]


def test_no_stop_strings_releases_everything():
    out, stopped, matcher = feed_all([], ["a", "b"])
    assert out == ["a", "b"] and not stopped and matcher.flush() == ""


def test_text_stream_flushes_held_text_at_the_end(toy):
    _, tokenizer = toy
    ids = tokenizer("x = 1\nEN", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [], ("END",))
    text = "".join(stream.push(t)[0] for t in ids)
    assert text + stream.finish() == "x = 1\nEN"


@pytest.mark.parametrize("which", ["byte-level", "sentencepiece-style"])
def test_logprob_token_texts_equal_full_prefix_decoding(which, toy, sentencepiece_style):
    """completions.piece_texts decodes with a short left context; the texts equal those of decoding
    every full prefix (quadratic), over multi-byte characters and across the whole text."""
    tokenizer = toy[1] if which == "byte-level" else sentencepiece_style
    text = TEXT * 3 if which == "byte-level" else "the lazy dog jumps over the quick fox " * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = []
    for i in range(len(ids)):
        before, after = tokenizer.decode(ids[:i]), tokenizer.decode(ids[: i + 1])
        full.append(after[len(before):] if after.startswith(before) else "")
    assert piece_texts(tokenizer, ids, 0, len(ids)) == full
    assert piece_texts(tokenizer, ids, 7, 20) == full[7:20]
