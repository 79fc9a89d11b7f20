"""The official LangChain retriever standard suite (``langchain-tests``) against CaselensRetriever."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests is not installed (pip install caselens[test])")

from langchain_tests.integration_tests import RetrieversIntegrationTests  # noqa: E402

import caselens  # noqa: E402
from caselens.langchain_retriever import CaselensRetriever  # noqa: E402

_KB: dict[str, str] = {}
ROWS = [("asthma", "Asthma is a chronic inflammatory disease of the airways."),
        ("copd", "Chronic obstructive pulmonary disease narrows the airways."),
        ("eczema", "Eczema is an inflammatory disease of the skin."),
        ("gout", "Gout is an arthritis caused by urate crystals."),
        ("angina", "Angina is chest pain from reduced blood flow to the heart.")]


@pytest.fixture(scope="module", autouse=True)
def _knowledge(tmp_path_factory: pytest.TempPathFactory, minilm) -> None:
    home = tmp_path_factory.mktemp("lc-home")
    corpus = home / "kb.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in ROWS))
    caselens.open("kb", home, create=True).ingest(text=corpus, progress=False)
    _KB["home"] = str(home)


class TestCaselensRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[CaselensRetriever]:
        return CaselensRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"collection": "kb", "home": _KB["home"]}

    @property
    def retriever_query_example(self) -> str:
        return "airway inflammation"


def test_documents_carry_ids_and_the_collection_stays_open() -> None:
    retriever = CaselensRetriever(collection="kb", home=_KB["home"], k=2)
    first = retriever.invoke("airway inflammation")
    handle = retriever._collection()
    assert [d.id for d in first] == [d.metadata["id"] for d in first] and first[0].id in ("asthma", "copd")
    assert retriever.invoke("skin", k=1)[0].id == "eczema" and retriever._collection() is handle
    assert retriever.invoke("skin", where="id <> 'eczema'", k=1)[0].id != "eczema"
