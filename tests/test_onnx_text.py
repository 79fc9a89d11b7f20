"""The ONNX Runtime text encoder (``onnx-text:``): the packaged MiniLM exported for real (torch.onnx,
ONNX Runtime fusions and quantisation) into a temporary cache, compared with the PyTorch encoder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from caselens.errors import EncoderMismatchError, EncoderOptionError
from caselens.indexes.collection import Collection
from caselens.ingest.encoders import load_encoder, load_from_record
from caselens.ingest.encoders import onnx_text
from caselens.ingest.chunking import chunker_for
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource

SENTENCES = [
    "Chest radiograph shows a right lower lobe consolidation consistent with pneumonia.",
    "Metformin remains the first-line pharmacological therapy for type 2 diabetes mellitus.",
    "No acute intracranial haemorrhage.",
    "The patient was started on intravenous ceftriaxone and azithromycin.",
    "Dermoscopy revealed an atypical pigment network with regression structures.",
    "BRCA1 mutation carriers have a markedly increased lifetime risk of breast and ovarian cancer.",
    # longer than the 256-token window: both encoders must cut it the same way
    " ".join(["Randomised controlled trials of anticoagulation after pulmonary embolism report outcomes."] * 30),
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    """One export per test module, in a private cache folder."""
    root = tmp_path_factory.mktemp("caselens-cache")
    old = os.environ.get("CASELENS_CACHE")
    os.environ["CASELENS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CASELENS_CACHE", None)
    else:
        os.environ["CASELENS_CACHE"] = old


@pytest.fixture(scope="module")
def fp32(onnx_cache):
    return load_encoder("onnx-text:all-MiniLM-L6-v2@fp32")


@pytest.fixture(scope="module")
def int8(onnx_cache, fp32):
    return load_encoder("onnx-text:all-MiniLM-L6-v2@int8")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1)


def test_vectors_agree_with_pytorch(minilm, fp32, int8):
    want = minilm.encode_texts(SENTENCES)
    got32, got8 = fp32.encode_texts(SENTENCES), int8.encode_texts(SENTENCES)
    for v in (got32, got8):
        assert v.shape == want.shape and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert _cos(got32, want).min() >= 0.999
    assert _cos(got8, want).min() >= 0.98
    # a text of one or two tokens has nothing to average quantisation noise over: a little lower
    tiny = ["ok", "fever"]
    assert _cos(int8.encode_texts(tiny), minilm.encode_texts(tiny)).min() >= 0.95
    # a batch is the same as one text at a time (padding and the length sort change nothing)
    one_by_one = np.concatenate([fp32.encode_texts([t]) for t in SENTENCES])
    np.testing.assert_allclose(one_by_one, got32, atol=1e-5)
    # queries: the same model (no prefix), and the nearest sentence is the PyTorch one's
    q = ["first-line drug for type 2 diabetes"]
    assert int((fp32.encode_queries(q) @ got32.T).argmax()) == int((minilm.encode_queries(q) @ want.T).argmax()) == 1


def test_tokens_and_window_match_pytorch(minilm, fp32):
    assert fp32.max_tokens() == minilm.max_tokens() == 256
    for text in SENTENCES + ["", "  spaced   out  "]:
        assert fp32.count_tokens(text) == minilm.count_tokens(text)
    long = SENTENCES[-1]
    assert [c.text for c in chunker_for(fp32).split(long)] == [c.text for c in chunker_for(minilm).split(long)]


def test_fingerprints_distinguish_variants(minilm, fp32, int8, onnx_cache):
    prints = {minilm.info.fingerprint, fp32.info.fingerprint, int8.info.fingerprint}
    assert len(prints) == 3
    assert fp32.info.spec == "onnx-text:all-MiniLM-L6-v2@fp32" and int8.info.spec.endswith("@int8")
    # a collection rebuilds the same encoder from its stored record
    again = load_from_record(json.loads(json.dumps(int8.info.to_record())))
    assert again.info.fingerprint == int8.info.fingerprint
    assert "threads" not in int8.info.options  # a machine setting, not part of the vectors
    assert load_encoder("onnx-text:all-MiniLM-L6-v2").info.fingerprint == fp32.info.fingerprint  # no @: fp32
    prefixed = load_encoder("onnx-text:all-MiniLM-L6-v2@int8", {"query_prefix": "query: "})
    assert prefixed.info.fingerprint != int8.info.fingerprint


def test_export_is_cached_and_reused(int8, onnx_cache, monkeypatch):
    folder = int8.path.parent
    manifest = json.loads((folder / onnx_text.MANIFEST).read_text())
    assert set(manifest["files"]) == {"fp32", "int8"} and folder.parent.name == "onnx"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache is valid")

    monkeypatch.setattr(onnx_text, "_export_fp32", no_export)
    monkeypatch.setattr(onnx_text, "_quantize_int8", no_export)
    again = load_encoder("onnx-text:all-MiniLM-L6-v2@int8")
    assert again.path == int8.path
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == before


def test_damaged_cache_file_is_exported_again(int8, onnx_cache, monkeypatch, caplog):
    path = int8.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    calls = []
    real = onnx_text._quantize_int8
    monkeypatch.setattr(onnx_text, "_quantize_int8", lambda *a: calls.append(1) or real(*a))
    with caplog.at_level("WARNING"):
        fresh = load_encoder("onnx-text:all-MiniLM-L6-v2@int8")
    assert calls == [1] and "damaged" in caplog.text
    manifest = json.loads((path.parent / onnx_text.MANIFEST).read_text())
    from caselens.files import sha256_file

    assert sha256_file(path) == manifest["files"]["int8"]["sha256"]
    np.testing.assert_allclose(fresh.encode_texts(SENTENCES[:3]), int8.encode_texts(SENTENCES[:3]), atol=1e-6)


def test_mixing_variants_in_one_collection_is_refused(fp32, int8, home, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES[:4])))
    coll = Collection.create("kb", int8.info.to_record(), home)
    report = ingest(TextCorpusSource(corpus, chunker=chunker_for(int8)), coll, int8,
                    IngestConfig(progress=False, build_index=False))
    assert report.accepted == 4
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        ingest(TextCorpusSource(corpus), coll, fp32, IngestConfig(progress=False, build_index=False))
    assert coll.count() == 4


@pytest.mark.parametrize("target,want", [
    ("all-MiniLM-L6-v2@int8", ("all-MiniLM-L6-v2", "int8")),
    ("all-MiniLM-L6-v2@INT8", ("all-MiniLM-L6-v2", "int8")),
    ("all-MiniLM-L6-v2", ("all-MiniLM-L6-v2", "fp32")),
    ("/models/a@b/minilm", ("/models/a@b/minilm", "fp32")),
])
def test_parse_target(target, want):
    assert onnx_text.parse_target(target) == want


def test_bad_names_and_models_are_refused(tmp_path):
    with pytest.raises(EncoderOptionError, match="precision 'fp16'"):
        load_encoder("onnx-text:all-MiniLM-L6-v2@fp16")
    with pytest.raises(EncoderOptionError, match="batch_size"):
        load_encoder("onnx-text:all-MiniLM-L6-v2@int8", {"batch_size": 0})
    with pytest.raises(EncoderOptionError, match="neither"):
        load_encoder(f"onnx-text:{tmp_path / 'absent'}")
    folder = tmp_path / "dense-head"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(EncoderOptionError, match="Dense"):
        load_encoder(f"onnx-text:{folder}")
