"""Stop sequences are text (tokenizer.StopSequences): matched on the deltas the incremental detokenizer makes, as
suffixes of the text so far, where the router and loom.LLM make text. The engine only stops on length and EOS."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loom.tokenizer import IncrementalDetokenizer, StopSequences


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _feed(tokenizer, stop: list[str], text_pieces: list[str]) -> list[bool]:
    prompt = tokenizer.encode("Say something:")
    ids = [t for piece in text_pieces for t in tokenizer.encode(piece)]
    assert len(ids) == len(text_pieces)  # one token per piece
    detok = IncrementalDetokenizer.for_prompt(tokenizer, prompt)
    stops = StopSequences(tuple(stop))
    return [stops.push(detok.push(t)) for t in ids]


def test_a_stop_sequence_spanning_two_tokens(tokenizer):
    assert _feed(tokenizer, ["lo world"], ["Hello", " world", "!"]) == [False, True, False]


def test_a_stop_sequence_that_never_completes(tokenizer):
    assert _feed(tokenizer, ["world?"], ["Hello", " world", "!"]) == [False, False, False]


def test_any_of_several_and_the_buffer_keeps_the_recent_text():
    stops = StopSequences(("END", "stop here"))
    assert not stops.push("x" * 500) and len(stops.text) <= 300
    assert not stops.push("") and not stops.push("sto")
    assert stops.push("p here")
    assert StopSequences(("END",)).push("THE END")
