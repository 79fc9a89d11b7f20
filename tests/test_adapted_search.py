"""A collection with an adapter is searched in the adapter's space everywhere: the FAISS index,
the rows committed since it, every kind of query; the diagnosis API and CLI on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import caselens
from caselens.cli import main
from caselens.errors import AdaptationError
from caselens.indexes import derived, faiss_index
from caselens.indexes.collection import Collection
from caselens.indexes.reader import reader_of
from caselens.indexes.space import ADAPTER_MARK, space_of
from caselens.ingest.deid import pseudonym


def _clusters(n_per_class: int, classes: int, dim: int, noise_dims: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Class signal in a few directions under larger noise: raw cosine is mediocre, a projection helps."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    y = np.repeat(np.arange(classes), n_per_class)
    x = np.hstack([rng.normal(size=(len(y), dim)) + centres[y], rng.normal(size=(len(y), noise_dims)) * 3])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"c{v}" for v in y]


def _store(home: Path, x: np.ndarray, labels: list[str | None], start: int = 0, name: str = "arch") -> Collection:
    record = {"spec": "test-vectors", "dim": x.shape[1], "fingerprint": "enc-test", "modalities": ["image"], "options": {}}
    col = Collection.open(name, home) if Collection.exists(name, home) else Collection.create(name, record, home)
    key = col.secret()  # patients stored pseudonymised with the collection's key, as ingest stores them
    col.add([{"id": f"item{start + i}", "kind": "image", "source": f"i{start + i}.png", "provenance": {},
              "metadata": {"label": labels[i], "patient_id": pseudonym(f"p{(start + i) // 2}", key, "patient"),
                           "modality": "XR"}}
             for i in range(len(x))], x)
    return col


def _exact(space_vectors: np.ndarray, ids: list[str], query: np.ndarray, k: int, leave_out: set[str]) -> list[str]:
    scores = space_vectors @ query
    order = [i for i in np.argsort(-scores, kind="stable") if ids[i] not in leave_out]
    return [ids[i] for i in order[:k]]


@pytest.fixture()
def adapted(home: Path) -> tuple[caselens.Collection, np.ndarray, list[str]]:
    x, y = _clusters(24, 3, 12, 12, seed=3)
    storage = _store(home, x, list(y))
    derived.refresh(storage)
    col = caselens.open("arch", home)
    out = col.adapt("label", "lda", folds=3)
    assert out["adapter"] != "raw" and out["chosen_p_at_k"] > out["raw_p_at_k"]
    return col, x, list(y)


def test_adapt_rebuilds_the_index_in_the_adapted_space_and_every_query_passes_through_it(adapted, home: Path) -> None:
    col, x, y = adapted
    storage = col.storage
    space = space_of(storage)
    stamp = faiss_index.read_stamp(storage.layout.faiss_dir)
    assert space.adapted and stamp.encoder_fingerprint == space.fingerprint and ADAPTER_MARK in stamp.encoder_fingerprint
    assert stamp.table_version == storage.version and col.info()["space"]["adapted"]
    ids = [f"item{i}" for i in range(len(x))]
    adapted_x = space.apply(x)
    for i in (0, 30, 60):
        by_id = [h.id for h in col.search(id=ids[i], k=5).hits]
        assert by_id == _exact(adapted_x, ids, adapted_x[i], 5, {ids[i]})
        by_vector = [h.id for h in col.search(vector=x[i], k=5).hits]
        assert by_vector == _exact(adapted_x, ids, adapted_x[i], 5, set())
    # the adapted ranking is not the raw one (otherwise this test proves nothing)
    raw = _exact(x, ids, x[0], 5, {ids[0]})
    assert raw != _exact(adapted_x, ids, adapted_x[0], 5, {ids[0]})


def test_rows_committed_after_the_index_are_ranked_in_the_adapted_space(adapted, home: Path) -> None:
    col, x, y = adapted
    extra, extra_y = _clusters(4, 3, 12, 12, seed=9)
    _store(home, extra, list(extra_y), start=len(x))  # committed, no index refresh: delta rows
    storage = Collection.open("arch", home)
    view = reader_of(storage).view()
    assert len(view.delta_rows) == len(extra) and view.delta_vectors.shape[1] == space_of(storage).dim
    every = np.vstack([x, extra])
    ids = [f"item{i}" for i in range(len(every))]
    space = space_of(storage)
    found = [h.id for h in caselens.open("arch", home).search(vector=extra[0], k=8).hits]
    assert found == _exact(space.apply(every), ids, space.apply(extra[:1])[0], 8, set())
    assert f"item{len(x)}" == found[0]


def test_remove_adapter_goes_back_to_raw_vectors(adapted, home: Path) -> None:
    col, x, _ = adapted
    assert col.remove_adapter()
    storage = col.storage
    assert not space_of(storage).adapted
    assert faiss_index.read_stamp(storage.layout.faiss_dir).encoder_fingerprint == "enc-test"
    ids = [f"item{i}" for i in range(len(x))]
    assert [h.id for h in col.search(id="item0", k=5).hits] == _exact(x, ids, x[0], 5, {"item0"})
    assert not col.remove_adapter()
    with pytest.raises(AdaptationError, match="caselens adapt arch"):
        col.diagnose(id="item0")


def test_a_reader_made_before_the_adapter_picks_it_up(home: Path) -> None:
    x, y = _clusters(24, 3, 12, 12, seed=5)
    storage = _store(home, x, list(y))
    derived.refresh(storage)
    col = caselens.open("arch", home)
    before = [h.id for h in col.search(id="item1", k=5).hits]
    other = caselens.open("arch", home)  # another handle (as another process would): its own reader
    other.adapt("label", "lda", folds=3)
    space = space_of(col.storage)
    ids = [f"item{i}" for i in range(len(x))]
    after = [h.id for h in col.search(id="item1", k=5).hits]
    assert after == _exact(space.apply(x), ids, space.apply(x[1:2])[0], 5, {"item1"}) and after != before


def test_diagnose_votes_with_calibrated_probabilities_and_never_uses_the_patient(adapted) -> None:
    col, x, y = adapted
    d = col.diagnose(id="item5")
    assert abs(sum(d.probabilities.values()) - 1) < 1e-3 and set(d.probabilities) == {"c0", "c1", "c2"}
    assert d.top_label == max(d.probabilities, key=d.probabilities.get)
    supporting = {c.id for c in d.supporting}
    assert "item5" not in supporting and "item4" not in supporting  # item4 shares patient p2
    assert d.supporting and all(c.key == f"case:{c.id}" for c in d.supporting)
    assert d.top_label == y[5]
    three = col.diagnose(id="item5", k=3)
    assert three.k == 3 and sum(c.weight > 0 for c in three.supporting) <= 3
    # a vector query of an outside case, its patient named: that patient's cases are left out
    outside = col.diagnose(vector=x[40], query_patient="p20")
    assert "item40" not in {c.id for c in outside.supporting} and "item41" not in {c.id for c in outside.supporting}


def test_held_out_cases_are_diagnosed_better_than_by_raw_neighbours(home: Path) -> None:
    x, y = _clusters(40, 3, 12, 12, seed=11)
    y = np.asarray(y)
    held = np.arange(len(x)) % 6 == 0
    storage = _store(home, x[~held], list(y[~held]))
    derived.refresh(storage)
    col = caselens.open("arch", home)
    col.adapt("label", "auto", folds=3)
    adapted = np.mean([col.diagnose(vector=v).top_label == t for v, t in zip(x[held], y[held])])
    top = np.argsort(-(x[held] @ x[~held].T), axis=1)[:, :10]  # raw 10-NN majority vote
    raw = np.mean([max(set(r), key=list(r).count) == t for r, t in zip(y[~held][top], y[held])])
    assert adapted >= raw + 0.1 and adapted > 0.5, (adapted, raw)  # chance: 1/3


def test_cli_adapt_diagnose_and_eval(adapted, home: Path, capsys, tmp_path: Path) -> None:
    assert main(["--home", str(home), "diagnose", "arch", "--id", "item7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top_label"] in {"c0", "c1", "c2"} and out["supporting"]
    assert main(["--home", str(home), "diagnose", "arch", "--id", "item7"]) == 0
    text = capsys.readouterr().out
    assert "label probabilities" in text and "supporting cases" in text
    assert main(["--home", str(home), "eval", "retrieval", "arch", "--folds", "3", "--method", "lda", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folds"] == 3 and result["overall"]["adapted"] > result["overall"]["raw"]
    assert main(["--home", str(home), "eval", "diagnosis", "arch", "--folds", "3", "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and (tmp_path / "ev" / "diagnosis_eval.json").is_file()
    assert main(["--home", str(home), "adapt", "arch", "--remove"]) == 0
    assert "removed the adapter" in capsys.readouterr().out
    assert main(["--home", str(home), "diagnose", "arch", "--id", "item7"]) == 2
    assert "caselens adapt arch" in capsys.readouterr().err


def test_verify_checks_an_adapted_index(adapted) -> None:
    col, _, _ = adapted
    report = col.verify()  # (items stored by Collection.add have no ledger rows: phantoms, not index problems)
    assert not report["index_problems"] and report["index_compared"] == 72 and report["index_mismatches"] == 0
    assert report["self_checked"] == 72 and report["self_missed"] == 0
