"""A minimal OpenAI-compatible chat endpoint over a local transformers model, for harness checks.

    python benchmarks/openai_server.py --model gemma --port 8011 &
    caselens --home H eval qa --questions ../shared/data/qa/mirage_dev.json --knowledge pubmed \
        --generator openai:http://127.0.0.1:8011/v1 --limit-per-task 10

It speaks the subset of the protocol caselens' ``openai:`` generator uses (``POST /v1/chat/completions``
with text or text+image_url content parts, ``GET /v1/models``), so a QA evaluation runs through the
real HTTP client exactly as it would against vLLM, Ollama or llama.cpp's server. The model generates
greedily from the messages' text joined in order (images are counted, not seen: the default model is
text-only). It is a test fixture for the harness, not a serving stack: one request at a time, no
streaming, no batching.
"""

from __future__ import annotations

import argparse
import http.server
import json
import threading
import time
from typing import Any

from caselens.retrieval.rag.generators import TransformersGenerator
from caselens.retrieval.rag.registry import load_generator


def chat_text(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The messages' text parts joined in order, and how many images they carried."""
    parts, images = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                images += 1
    return "\n\n".join(parts), images


def make_handler(generator: TransformersGenerator, model_name: str, lock: threading.Lock) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt, _ = chat_text(body["messages"])
                max_tokens = int(body.get("max_tokens") or 128)
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": f"bad request: {exc}"}})
                return
            torch = generator._torch
            with lock, torch.no_grad():
                inputs = generator._ids(prompt)
                out = generator.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                               pad_token_id=generator.tokenizer.eos_token_id)
            new = out[0][inputs["input_ids"].shape[1]:]
            text = generator.tokenizer.decode(new, skip_special_tokens=True).strip()
            self._send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": model_name,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": int(inputs["input_ids"].shape[1]),
                                       "completion_tokens": int(len(new))}})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma", help="gemma or hf:<local model folder> (default gemma)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    args = p.parse_args()
    generator = load_generator(args.model)
    if not isinstance(generator, TransformersGenerator):
        raise SystemExit(f"--model {args.model!r} is not a transformers model (use gemma or hf:<folder>)")
    server = http.server.ThreadingHTTPServer((args.host, args.port),
                                             make_handler(generator, args.model, threading.Lock()))
    print(f"serving {generator.name} at http://{args.host}:{server.server_port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
