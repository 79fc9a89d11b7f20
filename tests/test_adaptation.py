"""Collection adaptation: the concat encoder, adapter storage, CV-chosen projections, leakage-free
evaluation; real LanceDB collections where a collection is involved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.errors import (AdaptationError, AdapterIntegrityError, AdapterMismatchError, EncoderMismatchError,
                             EncoderOptionError)
from caselens.indexes.adapter import Adapter, adapter_folder, load_adapter, read_record, remove_adapter, save_adapter
from caselens.indexes.collection import Collection
from caselens.ingest.encoders import load_encoder, load_from_record
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import ImageSource
from caselens.retrieval.adaptation.collection import (collection_adapter, fit_collection_adapter, is_stale,
                                                      read_labelled, remove_collection_adapter)
from caselens.retrieval.adaptation.fit import fit_adapter, select_adapter
from caselens.retrieval.adaptation.folds import group_folds
from caselens.retrieval.adaptation.linear import decompose, lda_grid
from caselens.retrieval.eval.adaptation_eval import evaluate_adaptation_arrays, evaluate_adapted_retrieval, outer_folds

from conftest import SHARED_MODELS, make_images, needs_shared

MOBILENET_V2 = SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite"
MOBILENET_V3 = SHARED_MODELS / "mobilenet_v3_small_075_224_embedder.tflite"
SMALL_GRIDS = {  # fewer settings: the tests are about behaviour, not the search
    "whiten": [{"dims": 8, "eps": 0.01}],
    "lda": [{"shrinkage": a, "dims": "all", "offset": o, "power_weight": 0.0} for a in (0.05, 0.3) for o in (0.0, 1.0)],
}


def _clusters(n_per_class: int = 30, classes: int = 3, dim: int = 24, spread: float = 0.35, seed: int = 0,
              noise_dims: int = 0):
    """Unit vectors: class signal in a few directions, buried under larger isotropic noise (so
    raw cosine is mediocre and a projection helps)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(y), dim)) + centres[y]
    if noise_dims:
        x = np.hstack([x, rng.normal(size=(len(y), noise_dims)) * 3])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([f"c{v}" for v in y], dtype=object)


def _record(dim: int, fingerprint: str = "enc-a") -> dict:
    return {"spec": "test-vectors", "dim": dim, "fingerprint": fingerprint, "modalities": ["image"], "options": {}}


def _array_collection(home: Path, x: np.ndarray, labels, patients=None, name: str = "arr",
                      fingerprint: str = "enc-a", start: int = 0) -> Collection:
    col = (Collection.open(name, home) if Collection.exists(name, home)
           else Collection.create(name, _record(x.shape[1], fingerprint), home))
    records = [{"id": f"item{start + i}", "kind": "image", "source": f"i{start + i}.png", "provenance": {},
                "metadata": {"label": None if labels[i] is None else str(labels[i]),
                             "patient_id": None if patients is None else patients[i]}} for i in range(len(x))]
    col.add(records, x)
    return col


# ------------------------------------------------------------------------------------ concat encoder
def test_concat_encoder_parts_fingerprint_and_rebuild() -> None:
    enc = load_encoder("concat:classic+pixels")
    classic, pixels = load_encoder("classic"), load_encoder("pixels")
    assert enc.info.dim == classic.info.dim + pixels.info.dim
    assert enc.info.modalities == ("image",)
    images = [Image.new("RGB", (40, 40), (i * 40, 20, 200 - i * 30)) for i in range(4)]
    v = enc.encode_images(images)
    assert v.shape == (4, enc.info.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # each part L2-normalised, equal weights: both halves have norm 1/sqrt(2)
    assert np.allclose(np.linalg.norm(v[:, :classic.info.dim], axis=1), 2 ** -0.5, atol=1e-5)
    assert np.allclose(v[:, :classic.info.dim] * 2 ** 0.5, classic.encode_images(images), atol=1e-5)
    # the stored record rebuilds the same encoder; options spelled as JSON give the same fingerprint
    again = load_from_record(json.loads(json.dumps(enc.info.to_record())))
    assert again.info.fingerprint == enc.info.fingerprint
    as_json = load_encoder("concat", {"parts": '[{"spec": "classic"}, {"spec": "pixels", "options": {"size": 16}}]'})
    assert as_json.info.fingerprint == enc.info.fingerprint
    # the parts, their options and the weights are part of the fingerprint
    assert load_encoder("concat:pixels+classic").info.fingerprint != enc.info.fingerprint
    assert load_encoder("concat", {"parts": '[{"spec": "classic"}, {"spec": "pixels", "options": {"size": 8}}]'}
                        ).info.fingerprint != enc.info.fingerprint
    weighted = load_encoder("concat:classic+pixels", {"weights": "3,1"})
    assert weighted.info.fingerprint != enc.info.fingerprint
    w = weighted.encode_images(images[:1])
    assert np.linalg.norm(w[0, :classic.info.dim]) ** 2 == pytest.approx(0.75, abs=1e-4)


@pytest.mark.parametrize("name,options,fragment", [
    ("concat", {}, "no parts"),
    ("concat:classic", {}, "at least two"),
    ("concat:classic+pixels", {"parts": "[]"}, "not both"),
    ("concat", {"parts": "{nope"}, "not valid JSON"),
    ("concat", {"parts": '[{"spec": "classic"}, {"name": "pixels"}]'}, "part 1"),
    ("concat:classic+pixels", {"weights": "1"}, "2 positive numbers"),
    ("concat:classic+pixels", {"colour": "1"}, "unknown option"),
    ("concat:classic+concat", {}, "cannot itself be a concat"),
])
def test_concat_encoder_errors_name_the_problem(name, options, fragment) -> None:
    with pytest.raises(EncoderOptionError, match=fragment):
        load_encoder(name, options)


def test_concat_encoder_modalities_are_the_intersection(minilm) -> None:
    from caselens.errors import UnsupportedModalityError

    with pytest.raises(EncoderOptionError, match="share no modality"):
        load_encoder("concat:classic+sentence-transformers:all-MiniLM-L6-v2")
    both = load_encoder("concat", {"parts": json.dumps([{"spec": "sentence-transformers:all-MiniLM-L6-v2"}] * 2)})
    assert both.info.modalities == ("text",)
    assert both.encode_texts(["chest pain"]).shape == (1, 2 * minilm.info.dim)
    with pytest.raises(UnsupportedModalityError):
        both.encode_images([Image.new("RGB", (8, 8))])


@needs_shared(MOBILENET_V2)
@needs_shared(MOBILENET_V3)
def test_concat_encoder_with_the_mobilenets() -> None:
    parts = [{"spec": "classic"},
             {"spec": f"tflite:{MOBILENET_V2}", "options": {"output": "MobilenetV2/Logits/AvgPool"}},
             {"spec": f"tflite:{MOBILENET_V3}"}]
    enc = load_encoder("concat", {"parts": json.dumps(parts)})
    assert enc.info.dim == load_encoder("classic").info.dim + 1280 + 1024
    images = [Image.new("RGB", (64, 64), (200, 10 * i, 30)) for i in range(3)]
    v = enc.encode_images(images)
    assert v.shape == (3, enc.info.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert load_from_record(json.loads(json.dumps(enc.info.to_record()))).info.fingerprint == enc.info.fingerprint


# ------------------------------------------------------------------------------------------ storage
def _adapter(dim: int = 6, out: int = 3, fingerprint: str = "enc-a") -> Adapter:
    rng = np.random.default_rng(1)
    return Adapter("lda", fingerprint, dim, mean=rng.normal(size=dim), matrix=rng.normal(size=(dim, out)),
                   bias=np.r_[np.zeros(out - 1), 0.5], provenance={"table_version": 3, "label_column": "label"})


def test_adapter_apply_gives_unit_vectors_of_the_affine_map() -> None:
    a = _adapter()
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    z = a.apply(x)
    expected = (x - a.mean) @ a.matrix + a.bias
    assert np.allclose(z, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    assert a.out_dim == 3 and not a.is_identity
    ident = Adapter.identity("enc-a", 6)
    assert ident.is_identity and np.allclose(ident.apply(x), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    from caselens.errors import BadVectorError

    with pytest.raises(BadVectorError):
        a.apply(np.ones((2, 5)))
    with pytest.raises(AdapterIntegrityError):
        Adapter("lda", "enc-a", 6, matrix=np.ones((5, 2)))


def test_adapter_save_load_round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    a = _adapter()
    folder = tmp_path / "adapter"
    save_adapter(a, folder)
    record = json.loads((folder / "adapter.json").read_text())
    assert record["encoder_fingerprint"] == "enc-a" and record["provenance"]["table_version"] == 3
    assert set(record["arrays"]) == {"mean", "matrix", "bias"}
    b = load_adapter(folder, "enc-a")
    x = np.random.default_rng(3).normal(size=(4, 6))
    assert b.fingerprint == a.fingerprint and np.array_equal(b.apply(x), a.apply(x))
    matrix_file = folder / record["arrays"]["matrix"]["file"]
    data = bytearray(matrix_file.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the array
    matrix_file.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="damaged"):
        load_adapter(folder, "enc-a")
    matrix_file.unlink()
    with pytest.raises(AdapterIntegrityError, match="missing"):
        load_adapter(folder, "enc-a")
    save_adapter(a, folder)
    record = json.loads((folder / "adapter.json").read_text())
    record["power"] = 0.5  # a record that no longer matches its arrays' fingerprint
    (folder / "adapter.json").write_text(json.dumps(record))
    with pytest.raises(AdapterIntegrityError, match="fingerprint"):
        load_adapter(folder, "enc-a")
    (folder / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterIntegrityError):
        load_adapter(folder, "enc-a")


def test_adapter_arrays_are_never_pickled(tmp_path: Path) -> None:
    save_adapter(_adapter(), tmp_path)
    for npy in tmp_path.glob("*.npy"):
        arr = np.load(npy, allow_pickle=False)  # loads without pickle
        assert arr.dtype == np.float32


def test_refit_replaces_arrays_and_removal(tmp_path: Path) -> None:
    save_adapter(_adapter(), tmp_path)
    first = set(p.name for p in tmp_path.glob("*.npy"))
    save_adapter(_adapter(dim=6, out=2), tmp_path)
    second = set(p.name for p in tmp_path.glob("*.npy"))
    assert first != second and len(second) == 3  # the old arrays are gone
    assert load_adapter(tmp_path).out_dim == 2
    assert remove_adapter(tmp_path) and load_adapter(tmp_path) is None and not tmp_path.exists()
    assert remove_adapter(tmp_path) is False


def test_adapter_of_another_encoder_is_refused_like_an_encoder_mismatch(tmp_path: Path) -> None:
    save_adapter(_adapter(fingerprint="enc-a"), tmp_path)
    with pytest.raises(AdapterMismatchError, match="enc-a"):
        load_adapter(tmp_path, "enc-b")
    with pytest.raises(EncoderMismatchError):  # callers that refuse encoder mismatches refuse this too
        load_adapter(tmp_path, "enc-b")
    with pytest.raises(AdapterMismatchError):
        _adapter(fingerprint="enc-a").check_encoder("enc-b")


def test_collection_adapter_mismatch_is_refused(home: Path) -> None:
    x, y = _clusters(12, 2, 8)
    col = _array_collection(home, x, list(y), fingerprint="enc-b")
    save_adapter(_adapter(dim=8, fingerprint="enc-a"), adapter_folder(col.root))
    with pytest.raises(AdapterMismatchError):
        collection_adapter(col)


# --------------------------------------------------------------------------------------- fitting
def test_group_folds_keep_patients_together_and_spread_classes() -> None:
    y = np.array(["a"] * 40 + ["b"] * 20 + ["c"] * 10)
    groups = np.array([f"p{i // 2}" for i in range(70)])
    folds = group_folds(y, groups, 5, seed=0)
    for f in range(5):
        assert not set(groups[folds == f]) & set(groups[folds != f])
        assert ((folds == f) & (y == "c")).sum() == 2 and ((folds == f) & (y == "b")).sum() == 4
        assert (folds == f).sum() == 14
    assert np.array_equal(folds, group_folds(y, groups, 5, seed=0))
    with pytest.raises(AdaptationError, match="patient"):
        group_folds(y[:6], ["p"] * 6, 5)


def test_lda_matches_the_generalised_eigenproblem() -> None:
    rng = np.random.default_rng(0)
    n, d, c = 240, 30, 4
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y] * 0.5
    proj = lda_grid(decompose(x), y, [{"shrinkage": 0.1, "dims": "all"}])[0]
    mu = x.mean(0)
    sw = sum((x[y == k] - x[y == k].mean(0)).T @ (x[y == k] - x[y == k].mean(0)) for k in range(c)) / n
    sb = sum((y == k).sum() * np.outer(x[y == k].mean(0) - mu, x[y == k].mean(0) - mu) for k in range(c)) / n
    swa = 0.9 * sw + 0.1 * np.trace(sw) / d * np.eye(d)
    w = proj.matrix.astype(np.float64)
    assert np.allclose(w.T @ swa @ w, np.eye(c - 1), atol=1e-3)  # unit within-class variance, uncorrelated
    ratio = np.diag(w.T @ sb @ w)  # between/within along each direction = the top eigenvalues
    top = np.sort(np.linalg.eigvals(np.linalg.solve(swa, sb)).real)[::-1][:c - 1]
    assert np.allclose(ratio, top, rtol=1e-3)


def test_auto_adapts_when_labels_carry_signal() -> None:
    x, y = _clusters(40, 3, 16, spread=0.45, noise_dims=16)
    adapter, report = fit_adapter(x, list(y), encoder_fingerprint="enc-a", grids=SMALL_GRIDS)
    assert report.chosen_method == "lda" and report.gain > 0.1 and report.selection_gain > 0.05
    assert adapter.method == "lda" and adapter.out_dim in (2, 3)
    assert adapter.provenance["n_labelled"] == 120 and adapter.provenance["n_classes"] == 3
    assert set(adapter.provenance["cv_p_at_k"]) >= {"raw", "whiten(dims=8,eps=0.01)"}


def test_auto_keeps_raw_when_nothing_beats_it() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(150, 20)).astype(np.float32)
    y = rng.permutation(np.repeat(["a", "b", "c"], 50))  # balanced labels unrelated to the vectors
    adapter, report = fit_adapter(x, list(y), encoder_fingerprint="enc-a", grids=SMALL_GRIDS)
    assert report.chosen == "raw" and adapter.is_identity, report.decision
    assert "kept the raw vectors" in report.decision
    forced, forced_report = fit_adapter(x, list(y), encoder_fingerprint="enc-a", method="lda", grids=SMALL_GRIDS)
    assert forced.method == "lda" and forced_report.chosen_method == "lda"  # asked for: given


def test_unlabelled_items_are_left_out_of_the_fit_but_projected() -> None:
    x, y = _clusters(30, 2, 12, spread=0.6, noise_dims=8)
    labels = [None if i % 4 == 0 else v for i, v in enumerate(y)]
    adapter, report = fit_adapter(x, labels, encoder_fingerprint="enc-a", grids=SMALL_GRIDS, method="lda")
    assert report.n_labelled == 45 and report.n_items == 60
    z = adapter.apply(x)
    assert z.shape == (60, adapter.out_dim) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)


def test_fit_errors_name_the_problem() -> None:
    x, _ = _clusters(10, 2, 6)
    with pytest.raises(AdaptationError, match="two classes"):
        fit_adapter(x, ["a"] * 20, encoder_fingerprint="e")
    with pytest.raises(AdaptationError, match="unknown adapter method"):
        fit_adapter(x, ["a", "b"] * 10, encoder_fingerprint="e", method="magic")
    with pytest.raises(AdaptationError, match="one label per vector"):
        fit_adapter(x, ["a", "b"], encoder_fingerprint="e")


# ----------------------------------------------------------------------------------- no leakage
def test_the_adapter_never_sees_the_query_fold() -> None:
    """Labels unrelated to high-dimensional vectors: an LDA fitted with the queries in it would
    separate them by their own labels (P@10 far above chance); fitted on the archive alone it
    cannot. Each query is also planted in the archive under another patient: that copy must be
    out of the fit and the ranking, or it would be every query's first hit."""
    rng = np.random.default_rng(3)
    n, dim = 90, 120
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.permutation(np.repeat(["a", "b", "c"], n // 3))
    groups = [f"p{i}" for i in range(n)]
    x2 = np.vstack([x, x])  # every item again, under another patient, same label
    y2 = np.r_[y, y]
    g2 = groups + [f"copy{i}" for i in range(n)]
    grids = {"lda": [{"shrinkage": 0.001, "dims": "all", "offset": 0.0, "power_weight": 0.0}]}
    for of in outer_folds(x2, y2, g2, folds=3, method="lda", inner_folds=3, k=10, depth=10):
        q, a = set(of.queries.tolist()), set(of.archive.tolist())
        assert not q & a
        copies = {(i + n) % (2 * n) for i in q}
        assert not copies & a  # the planted copies of the queries are not in the archive
        assert of.fit.report.n_labelled == len(a)
        assert not set(of.adapted[0].ravel().tolist()) & (q | copies)
    result = evaluate_adaptation_arrays(x2, y2, g2, folds=3, method="lda", inner_folds=3, report_methods=())
    chance = 1 / 3
    assert result.overall["adapted"] < chance + 0.12, result.overall
    assert result.overall["raw"] < chance + 0.12, result.overall
    # the same LDA fitted with the queries in it is what a leak would look like: far above chance
    leaky = select_adapter(x, list(y), groups, encoder_fingerprint="e", method="lda", folds=3, grids=grids).adapter
    z = leaky.apply(x)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    assert (y[top] == y[:, None]).mean() > chance + 0.3


# ---------------------------------------------------------------------------------- collections
def test_fit_collection_adapter_on_a_real_collection_and_refit_after_more_items(home: Path) -> None:
    x, y = _clusters(20, 3, 16, spread=0.5, noise_dims=8, seed=4)
    patients = [f"p{i // 2}" for i in range(len(y))]
    col = _array_collection(home, x[:45], list(y[:45]), patients[:45])
    adapter, report = fit_collection_adapter(col, "label", "lda", folds=3, save=True)
    stored = collection_adapter(col)
    record = read_record(adapter_folder(col.root))
    assert stored.fingerprint == adapter.fingerprint
    assert record["provenance"]["table_version"] == col.version and record["provenance"]["n_labelled"] == 45
    assert record["provenance"]["label_column"] == "label" and record["provenance"]["group_column"] == "patient_id"
    assert record["encoder_fingerprint"] == "enc-a" and "lda" in record["method"]
    assert not is_stale(stored, col)
    _array_collection(home, x[45:], list(y[45:]), patients[45:], start=45)  # more items arrive
    assert is_stale(stored, col)
    again, _ = fit_collection_adapter(col, "label", "lda", folds=3, save=True)
    record2 = read_record(adapter_folder(col.root))
    assert record2["provenance"]["n_labelled"] == 60 and record2["provenance"]["table_version"] > record["provenance"]["table_version"]
    assert record2["fingerprint"] != record["fingerprint"] and collection_adapter(col).fingerprint == again.fingerprint
    assert remove_collection_adapter(col) and collection_adapter(col) is None


def test_adaptation_on_an_ingested_image_collection(home: Path, tmp_path: Path) -> None:
    folder = make_images(tmp_path / "imgs", n_per_class=9)
    enc = load_encoder("concat:classic+pixels")
    col = Collection.create("imgs", enc.info.to_record(), home)
    ingest(ImageSource(manifest=folder / "manifest.csv", secret=col.secret()), col, enc, IngestConfig(progress=False))
    data = read_labelled(col, "label")
    assert data.vectors.shape == (18, enc.info.dim) and data.groups is not None and set(data.labels) == {"stripes", "blob"}
    result = evaluate_adapted_retrieval(col, "label", folds=3, inner_folds=3)
    assert result.n_queries == 18 and set(result.overall) >= {"raw", "adapted", "lda"}
    assert result.fold_protocol == "patient-disjoint" and result.collection == "imgs"
    with pytest.raises(Exception, match="no column"):
        read_labelled(col, "diagnosis")


def test_metric_method_learns_a_projection_when_asked_for() -> None:
    x, y = _clusters(20, 3, 10, spread=0.6, noise_dims=6, seed=2)
    adapter, report = fit_adapter(x, list(y), encoder_fingerprint="enc-a", method="metric", folds=3,
                                  grids={"metric": [{"weight_decay": 1.0}]})
    assert report.chosen_method == "metric" and adapter.method == "metric"
    assert report.chosen_p_at_k > report.raw_p_at_k
    assert adapter.apply(x).shape == (60, adapter.out_dim)
