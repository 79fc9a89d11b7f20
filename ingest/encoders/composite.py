"""Several encoders at once: ``concat`` embeds each item with every part and concatenates.

Each part's vector is L2-normalised, multiplied by the square root of the part's weight, and the
parts are concatenated and scaled to unit length, so that the cosine of two concatenated vectors
is the weighted mean of the parts' cosines (equal weights by default). An adapter fitted on the
labelled archive (:mod:`caselens.retrieval.adaptation`) then learns which parts matter.

Parts are named in one of two ways:

* in the target, for parts without options: ``concat:classic+pixels``;
* as the option ``parts``: a JSON list (or a list) of ``{"spec": NAME, "options": {...}}``, e.g.
  ``--encoder concat --encoder-opt 'parts=[{"spec": "classic"}, {"spec": "tflite:/m/v3.tflite"}]'``.

Option ``weights`` (``1,1``: one number per part, > 0) weighs the parts. The fingerprint is made of
the parts' fingerprints and the weights; the modalities are those every part has.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from caselens.errors import EncoderOptionError
from caselens.ingest.encoders.base import Encoder, EncoderInfo, fingerprint, l2_normalize
from caselens.ingest.encoders.registry import load_encoder, register

COMPOSITE_VERSION = 1  # bump when the way parts are combined changes: it is part of the fingerprint


def _parse_parts(target: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts as a list of {"spec", "options"} from the target or the ``parts`` option."""
    given = options.get("parts")
    if target.strip() and given is not None:
        raise EncoderOptionError("concat: name the parts either in the target (concat:classic+pixels) or with "
                                 "the option parts=[...], not both")
    if target.strip():
        return [{"spec": name.strip(), "options": {}} for name in target.split("+")]
    if given is None:
        raise EncoderOptionError("concat: no parts; use concat:classic+pixels or the option "
                                 "parts='[{\"spec\": \"classic\"}, {\"spec\": \"pixels\"}]'")
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError as exc:
            raise EncoderOptionError(f"concat: option parts is not valid JSON ({exc.msg} at character {exc.pos}); "
                                     "give a list of {\"spec\": NAME, \"options\": {...}}") from None
    if not isinstance(given, list):
        raise EncoderOptionError("concat: option parts must be a list of {\"spec\": NAME, \"options\": {...}}")
    parts = []
    for i, part in enumerate(given):
        if isinstance(part, str):
            part = {"spec": part}
        if not isinstance(part, dict) or not isinstance(part.get("spec"), str) or not part["spec"].strip():
            raise EncoderOptionError(f"concat: part {i} must be an object with a non-empty \"spec\" string")
        unknown = set(part) - {"spec", "options"}
        if unknown:
            raise EncoderOptionError(f"concat: part {i} has unknown key(s) {sorted(unknown)}; allowed: spec, options")
        opts = part.get("options") or {}
        if not isinstance(opts, dict):
            raise EncoderOptionError(f"concat: part {i} options must be an object")
        parts.append({"spec": part["spec"].strip(), "options": dict(opts)})
    return parts


def _parse_weights(value: Any, n: int) -> list[float]:
    if value is None:
        return [1.0] * n
    try:
        weights = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise EncoderOptionError(f"concat: option weights={value!r} must be numbers, one per part") from None
    if len(weights) != n or not all(np.isfinite(w) and w > 0 for w in weights):
        raise EncoderOptionError(f"concat: option weights needs {n} positive numbers (one per part), got {value!r}")
    return weights


class ConcatEncoder(Encoder):
    """Normalised concatenation of several encoders' vectors (see module docstring)."""

    def __init__(self, parts: Sequence[Encoder], weights: Sequence[float] | None = None):
        if len(parts) < 2:
            raise EncoderOptionError("concat: needs at least two parts")
        self.parts = list(parts)
        self.weights = _parse_weights(list(weights) if weights is not None else None, len(self.parts))
        modalities = tuple(m for m in self.parts[0].info.modalities
                           if all(m in p.info.modalities for p in self.parts[1:]))
        if not modalities:
            raise EncoderOptionError("concat: the parts share no modality (" +
                                     "; ".join(f"{p.info.spec}: {', '.join(p.info.modalities)}" for p in self.parts)
                                     + "); combine encoders of the same kind")
        self._scale = [float(np.sqrt(w)) for w in self.weights]
        self.batch_size = min(p.batch_size for p in self.parts)
        records = [{"spec": p.info.spec, "options": p.info.options} for p in self.parts]
        self.info = EncoderInfo(
            spec="concat", dim=sum(p.dim for p in self.parts), modalities=modalities,
            fingerprint=fingerprint("concat", COMPOSITE_VERSION, [p.info.fingerprint for p in self.parts],
                                    self.weights),
            options={"parts": records, "weights": self.weights},
            description="concatenation of " + " + ".join(p.info.spec for p in self.parts))

    def _join(self, blocks: list[np.ndarray]) -> np.ndarray:
        return l2_normalize(np.concatenate([l2_normalize(b) * s for b, s in zip(blocks, self._scale)], axis=1))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if "image" not in self.info.modalities:
            return super().encode_images(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self._join([p.encode_images(images) for p in self.parts])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if "text" not in self.info.modalities:
            return super().encode_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self._join([p.encode_texts(texts) for p in self.parts])

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        if "text" not in self.info.modalities:
            return super().encode_queries(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self._join([p.encode_queries(texts) for p in self.parts])

    def max_tokens(self) -> int | None:
        limits = [n for n in (p.max_tokens() for p in self.parts) if n is not None]
        return min(limits) if limits else None

    def count_tokens(self, text: str) -> int | None:
        counts = [n for n in (p.count_tokens(text) for p in self.parts) if n is not None]
        return max(counts) if counts else None


@register("concat", "several encoders at once: normalised concatenation (concat:classic+pixels, or option parts=[...])")
def _load_concat(target: str, options: dict[str, Any]) -> Encoder:
    unknown = set(options) - {"parts", "weights"}
    if unknown:
        raise EncoderOptionError(f"encoder concat: unknown option(s) {sorted(unknown)}; allowed: ['parts', 'weights']")
    specs = _parse_parts(target, options)
    if any(s["spec"].split(":", 1)[0].strip().lower() == "concat" for s in specs):
        raise EncoderOptionError("concat: a part cannot itself be a concat encoder; list all parts at one level")
    parts = [load_encoder(s["spec"], s["options"]) for s in specs]
    return ConcatEncoder(parts, _parse_weights(options.get("weights"), len(parts)))
