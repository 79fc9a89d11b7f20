"""Chunking by the encoder's own tokenizer: limits, overlap, sentences, nothing lost."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caselens.ingest.chunking import ChunkConfig, Chunker, ChunkingError, chunk_text, chunker_for

WORDS = ["the", "alveolar", "macrophages", "pneumonia", "consolidation", "x-ray", "ΔΨm", "42", "mg/kg",
         "e.g.", "Dr.", "(CT)", "supercalifragilisticexpialidocious", "气管", "🙂", "Figure", "5.2", "\n", "\n\n"]


def _texts() -> st.SearchStrategy[str]:
    word = st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=40))
    sentence = st.lists(word, min_size=1, max_size=60).map(" ".join).map(lambda s: s + st_end(s))
    return st.lists(sentence, min_size=1, max_size=25).map(" ".join)


def st_end(s: str) -> str:
    return "." if len(s) % 3 else "?"


def _covered(text: str, chunks) -> bool:
    """Every non-whitespace character of ``text`` lies inside some chunk's span."""
    marks = bytearray(len(text))
    for c in chunks:
        marks[c.start:c.end] = b"\x01" * (c.end - c.start)
    return all(marks[i] or text[i].isspace() for i in range(len(text)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_texts(), size=st.integers(min_value=24, max_value=96), overlap=st.integers(min_value=0, max_value=8))
def test_chunks_never_exceed_the_tokenizer_limit_and_lose_nothing(minilm, text: str, size: int, overlap: int) -> None:
    chunker = chunker_for(minilm, size, overlap)
    chunks = chunker.split(text)
    assert chunks or not text.strip()
    for c in chunks:
        assert minilm.count_tokens(c.text) <= size  # measured with the encoder's own tokenizer
        assert c.tokens == minilm.count_tokens(c.text)
        assert c.text == text[c.start:c.end] and c.text.strip() == c.text and c.text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(a.start < b.start and a.end < b.end for a, b in zip(chunks, chunks[1:]))  # always moves on
    assert _covered(text, chunks)


def test_short_text_is_one_whole_chunk(minilm) -> None:
    chunks = chunk_text("  Chest pain on exertion.  ", minilm.count_tokens, 64, 8)
    assert len(chunks) == 1 and chunks[0].text == "Chest pain on exertion." and not chunks[0].cut


def test_sentence_boundaries_and_overlap(minilm) -> None:
    sentences = [f"Sentence number {i} describes finding {i} in the right lower lobe." for i in range(40)]
    text = " ".join(sentences)
    chunks = chunker_for(minilm, 64, 12).split(text)
    assert len(chunks) > 3 and not any(c.cut for c in chunks)
    for c in chunks:
        assert c.text.endswith(".")  # ends at a sentence boundary
    for a, b in zip(chunks, chunks[1:]):
        shared = a.end - b.start
        assert shared > 0  # consecutive chunks overlap
        assert minilm.count_tokens(text[b.start:a.end]) - 2 <= 12


def test_no_overlap_means_disjoint_chunks(minilm) -> None:
    text = " ".join(f"Finding {i} is a nodule of {i} millimetres." for i in range(60))
    chunks = chunker_for(minilm, 48, 0).split(text)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))
    assert re.sub(r"\s+", " ", " ".join(c.text for c in chunks)) == text


def test_overlong_sentence_is_cut_and_flagged(minilm) -> None:
    text = "Intro. " + " ".join(["pneumothorax"] * 300) + ". Outro."
    chunks = chunker_for(minilm, 32, 4).split(text)
    assert any(c.cut for c in chunks) and all(c.tokens <= 32 for c in chunks)
    assert _covered(text, chunks) and chunks[-1].text.endswith("Outro.")
    # a single unbroken 'word' longer than the limit is split at characters
    long_word = "qzxjkvwpqzxjkvwp" * 6  # 96 letters: WordPiece reads it as many pieces (over 100 it gives [UNK])
    pieces = chunker_for(minilm, 32, 0).split(long_word)
    assert len(pieces) > 1 and all(p.cut and p.tokens <= 32 for p in pieces)
    assert "".join(p.text for p in pieces) == long_word


def test_figure_caption_line_stays_whole(minilm) -> None:
    caption = "Figure 22.4 Upper Airway"
    text = ("The nasal cavity warms the air. " * 12) + "\n" + caption + "\n" + ("The sinuses lighten the skull. " * 12)
    chunks = chunker_for(minilm, 64, 0).split(text)
    assert sum(caption in c.text for c in chunks) == 1


def test_bad_settings_are_refused(minilm) -> None:
    with pytest.raises(ChunkingError, match="overlap"):
        chunker_for(minilm, 64, 40)
    with pytest.raises(ChunkingError, match="window"):
        chunker_for(minilm, 100_000)
    with pytest.raises(ChunkingError, match="at least"):
        Chunker(minilm.count_tokens, ChunkConfig(max_tokens=5, overlap=0))
