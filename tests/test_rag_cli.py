"""`ask` with citations, and the command line end to end (real collections, real encoders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caselens.indexes.collection import Collection
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource
from caselens.retrieval.cli import main
from caselens.retrieval.rag import ExtractiveGenerator, ask
from caselens.retrieval.rag.answer import citations
from caselens.retrieval.rag.generators import Passage, build_prompt

CORPUS = [
    {"id": "pneumonia", "text": "Pneumonia is an infection that inflames the air sacs in one or both lungs. "
                                "The air sacs may fill with fluid or pus, causing cough with phlegm, fever and chills."},
    {"id": "fracture", "text": "A fracture is a break in the continuity of a bone. Most fractures are caused by "
                               "high force impact or stress."},
    {"id": "melanoma", "text": "Melanoma is a skin cancer that develops from melanocytes. Asymmetry, irregular "
                               "borders and changing colour are warning signs."},
    {"id": "asthma", "text": "Asthma is a chronic disease of the airways with reversible obstruction, wheezing "
                             "and shortness of breath."},
]


@pytest.fixture
def kb(home: Path, tmp_path: Path, minilm) -> Collection:
    path = tmp_path / "kb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    coll = Collection.create("kb", minilm.info.to_record(), home)
    ingest(TextCorpusSource(path), coll, minilm, IngestConfig(progress=False))
    return coll


def test_citation_parsing() -> None:
    assert citations("A [1]. B [2, 3] and again [1].") == [1, 2, 3]
    assert citations("no citations") == []


def test_extractive_answer_cites_the_right_passage(kb: Collection) -> None:
    answer = ask(kb, "What causes pneumonia and what fills the air sacs?", k=3, generator="extractive")
    assert answer.passages[0]["id"] == "pneumonia"
    assert answer.grounded and 1 in answer.cited
    assert "air sacs" in answer.answer
    assert answer.generator.startswith("extractive")
    assert json.loads(answer.to_json())["grounded"] is True


class _Liar:
    name = "liar"

    def answer(self, question: str, passages) -> str:
        return f"Something unsupported [{len(passages) + 3}]."


def test_citation_to_unretrieved_passage_is_flagged(kb: Collection) -> None:
    answer = ask(kb, "What is asthma?", k=2, generator=_Liar())
    assert answer.invalid_citations == [5] and not answer.cited and not answer.grounded


def test_prompt_keeps_whole_sentences_and_numbering() -> None:
    long = "First sentence here. " * 60
    prompt = build_prompt("Q?", [Passage(1, "a", long, 0.9), Passage(2, "b", "Short one.", 0.5)], max_chars=100)
    assert "[1] First sentence here." in prompt and "[2] Short one." in prompt
    line = next(l for l in prompt.splitlines() if l.startswith("[1]"))
    assert line.endswith(".") and len(line) <= 110


def test_cli_ingest_search_ask_eval_info_ledger(home: Path, image_folder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    h = ["--home", str(home)]
    assert main(h + ["ingest", "imgs", "--manifest", str(image_folder / "manifest.csv"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "12 accepted" in out and "ledger:" in out and str(home) in out
    assert main(h + ["search", "imgs", "--image", str(image_folder / "blob_1.png"), "--k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["source"] == "blob_1.png" and len(hits) == 3
    assert main(h + ["search", "imgs", "--image", str(image_folder / "blob_1.png"), "--where", "label = 'stripes'"]) == 0
    assert "stripes" in capsys.readouterr().out
    out_json = tmp_path / "eval.json"
    assert main(h + ["eval", "retrieval", "imgs", "--exclude-same", "patient_id", "--json-out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["n_queries"] == 12 and 0 <= result["overall"]["map@10"] <= 1
    assert "overall" in capsys.readouterr().out
    assert main(h + ["info", "imgs"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 12 and info["encoder"]["spec"] == "classic" and info["faiss_index"]["fresh"]
    assert main(h + ["ledger", "imgs", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 12


def test_cli_errors_are_one_line_with_exit_2(home: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = ["--home", str(home)]
    assert main(h + ["search", "nope", "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "collection 'nope' not found" in err and "Traceback" not in err
    assert main(h + ["ingest", "imgs", "--images", str(image_folder / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(h + ["ingest", "imgs", "--images", str(image_folder), "--encoder", "nope:x"]) == 2
    assert "unknown encoder" in capsys.readouterr().err
    assert main(h + ["ingest", "imgs", "--manifest", str(image_folder / "manifest.csv"), "-q"]) == 0
    capsys.readouterr()
    assert main(h + ["ingest", "imgs", "--manifest", str(image_folder / "manifest.csv"), "--encoder", "pixels"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main(h + ["search", "imgs", "--text", "a chest x-ray"]) == 2
    assert "not text" in capsys.readouterr().err


@pytest.mark.slow
def test_gemma_generator_answers_from_package(kb: Collection) -> None:
    answer = ask(kb, "What is asthma?", k=2, generator="gemma")
    assert answer.generator.startswith("gemma") and answer.answer.strip()


def test_openai_compatible_endpoint_round_trip(kb: Collection) -> None:
    """A local HTTP server speaking the chat-completions protocol answers through the real client."""
    import http.server
    import threading

    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                           "content": "Asthma narrows the airways [1]."}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from caselens.retrieval.rag.generators import OpenAIChatGenerator

        gen = OpenAIChatGenerator(f"http://127.0.0.1:{server.server_port}/v1", model="tiny", api_key="sk-test")
        answer = ask(kb, "What is asthma?", k=2, generator=gen)
    finally:
        server.shutdown()
    assert answer.answer == "Asthma narrows the airways [1]." and answer.grounded
    request = seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "tiny"
    user = request["body"]["messages"][-1]["content"]
    assert "[1] Asthma is a chronic disease" in user and "Question: What is asthma?" in user


def test_unreachable_endpoint_is_a_clear_error(kb: Collection) -> None:
    from caselens.retrieval.rag.generators import OpenAIChatGenerator

    gen = OpenAIChatGenerator("http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(ConnectionError, match="unreachable"):
        ask(kb, "What is asthma?", k=1, generator=gen)
