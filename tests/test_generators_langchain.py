"""A local transformers generator (tiny random model built from a config) and the LangChain retriever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caselens.indexes.collection import Collection
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource
from caselens.retrieval.rag import Request, load_generator
from caselens.retrieval.rag.context import ContextItem

WORDS = ("the of and a to in is it airways asthma lung lungs disease chronic bone skin yes no which organ "
         "answer question sources source key doc cite A B C . , : [ ] < > = / \" ?").split()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer Llama with a word-level tokenizer, saved like any HF model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_transformers_generator_generates_and_scores_options(tiny_lm: Path) -> None:
    gen = load_generator(f"hf:{tiny_lm}")
    assert gen is load_generator(f"hf:{tiny_lm}")  # loaded once per process
    items = [ContextItem("doc:a", "doc", "kb", "a", "asthma is a chronic disease of the airways", 0.9)]
    text = gen.generate(Request("which organ ?", items, max_new_tokens=8))
    assert isinstance(text, str)
    scores = gen.option_scores("which organ ?", {"A": "airways", "B": "bone"})
    assert set(scores) == {"A", "B"} and all(s < 0 for s in scores.values())
    # The cached-prefix scoring equals a plain full forward pass over prompt + option.
    import torch

    for letter, text in {"A": "airways", "B": "bone skin"}.items():
        base = gen.tokenizer("which organ ?", return_tensors="pt")["input_ids"]
        cont = gen.tokenizer(f" {letter}. {text}", add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([base, cont], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(gen.model(ids).logits[0, :-1].float(), dim=-1)
        naive = float(logp[-cont.shape[1]:].gather(1, ids[0, -cont.shape[1]:, None]).mean())
        assert gen.option_scores("which organ ?", {letter: text})[letter] == pytest.approx(naive, abs=1e-4)
    request = Request("which organ ?", items, task="mc", options={"A": "airways", "B": "bone"})
    expected = gen.option_scores(request.prompt(), request.options)
    choice = gen.generate(request)
    assert choice == f"{max(expected, key=expected.get)}. {request.options[max(expected, key=expected.get)]}"
    assert gen.count_tokens("asthma lung") == 2


def test_langchain_retriever_and_chain(home: Path, tmp_path: Path, minilm) -> None:
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    from caselens.langchain_retriever import CaselensRetriever

    corpus = tmp_path / "kb.jsonl"
    rows = [{"id": "asthma", "text": "Asthma is a chronic disease of the airways.", "topic": "lung"},
            {"id": "eczema", "text": "Eczema is an inflammatory disease of the skin.", "topic": "skin"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    coll = Collection.create("kb", minilm.info.to_record(), home)
    ingest(TextCorpusSource(corpus), coll, minilm, IngestConfig(progress=False))

    retriever = CaselensRetriever(collection="kb", home=str(home), k=2)
    docs = retriever.invoke("airway inflammation")
    assert docs[0].metadata["id"] == "asthma" and docs[0].metadata["key"] == "doc:asthma"
    assert docs[0].metadata["score"] > docs[1].metadata["score"] and docs[0].metadata["topic"] == "lung"
    filtered = CaselensRetriever(collection="kb", home=str(home), k=2, where="topic = 'skin'").invoke("airways")
    assert [d.metadata["id"] for d in filtered] == ["eczema"]

    # A small runnable chain: retrieve -> format with citation keys -> answer.
    chain = ({"docs": retriever, "question": RunnablePassthrough()}
             | RunnableLambda(lambda x: "\n".join(f"[{d.metadata['key']}] {d.page_content}" for d in x["docs"]))
             | RunnableLambda(lambda context: context.splitlines()[0]))
    assert chain.invoke("Which disease affects the airways?").startswith("[doc:asthma] Asthma")


def test_calibrated_option_choice_removes_the_content_free_prior(tiny_lm: Path) -> None:
    """With ``calibrate``, the choice maximises score(option | prompt) - score(option | "N/A" prompt)."""
    from caselens.retrieval.rag.generators import TransformersGenerator
    from caselens.retrieval.rag.prompts import build_prompt

    raw = TransformersGenerator(str(tiny_lm))
    calibrated = TransformersGenerator(str(tiny_lm), calibrate=True)
    assert "calibrated" in calibrated.name and "calibrated" not in raw.name
    items = [ContextItem("doc:a", "doc", "kb", "a", "asthma is a chronic disease of the airways", 0.9)]
    vocab = ["asthma", "chronic", "disease", "airways", "lung", "bone", "skin", "heart", "organ", "which"]
    differed = 0
    for i in range(12):
        options = {"A": vocab[i % 10], "B": vocab[(i + 3) % 10], "C": vocab[(i + 6) % 10] + " " + vocab[(i + 1) % 10]}
        request = Request(f"which {vocab[(i + 4) % 10]} ?", items, task="mc", options=options)
        real = raw.option_scores(request.prompt(), options)
        prior = raw.option_scores(build_prompt("N/A", [], "mc", options), options)
        assert calibrated.prior_scores(request) == pytest.approx(prior, abs=1e-5)
        want = max(options, key=lambda k: real[k] - prior[k])
        assert calibrated.generate(request) == f"{want}. {options[want]}"
        differed += raw.generate(request) != calibrated.generate(request)
    assert differed, "calibration never changed a choice: the prior is not being removed"
