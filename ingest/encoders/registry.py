"""One registry and one name syntax for every encoder.

Names look like ``scheme:target`` (``classic``, ``pixels``, ``sentence-transformers:all-MiniLM-L6-v2``,
``open_clip:ViT-B-32@laion2b_s34b_b79k``, ``open_clip:ViT-B-32@/path/ckpt.pt``,
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, ``onnx:/path/model.onnx``,
``tflite:/path/model.tflite``). Options (input size, normalisation, output tensor, …) come as a
separate mapping, are validated by the scheme's loader, and are stored with the collection so it
can always rebuild its own encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from caselens.errors import UnknownEncoderError
from caselens.ingest.encoders.base import Encoder

_SCHEME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
Loader = Callable[[str, dict[str, Any]], Encoder]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    summary: str  # one line for `caselens encoders`


_REGISTRY: dict[str, _Entry] = {}
# Aliases map a scheme onto another, with the alias kept in the target (hf-hub: -> open_clip:hf-hub:).
_ALIASES: dict[str, Callable[[str], tuple[str, str]]] = {
    "hf-hub": lambda target: ("open_clip", f"hf-hub:{target}"),
    "local-dir": lambda target: ("open_clip", f"local-dir:{target}"),
}


def register(scheme: str, summary: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(target, options) -> Encoder`` under ``scheme``.

    Rejects malformed schemes and second registrations of one scheme.
    """
    if not isinstance(scheme, str) or not _SCHEME_RE.fullmatch(scheme):
        raise ValueError(f"encoder scheme {scheme!r} must be lower-case letters, digits, '-' or '_'")

    def decorate(loader: Loader) -> Loader:
        if scheme in _REGISTRY or scheme in _ALIASES:
            raise ValueError(f"encoder scheme {scheme!r} is already registered")
        if not callable(loader):
            raise TypeError(f"loader for {scheme!r} must be callable")
        _REGISTRY[scheme] = _Entry(loader, summary)
        return loader

    return decorate


def parse_name(name: str) -> tuple[str, str]:
    """Split an encoder name into (scheme, target), resolving aliases."""
    name = name.strip()
    scheme, _, target = name.partition(":")
    scheme = scheme.lower()
    if scheme in _ALIASES:
        return _ALIASES[scheme](target)
    return scheme, target


def available() -> dict[str, str]:
    """Registered schemes and their one-line summaries."""
    _load_builtin()
    return {k: v.summary for k, v in sorted(_REGISTRY.items())}


def load_encoder(name: str, options: dict[str, Any] | None = None) -> Encoder:
    """Load an encoder by name; see the module docstring for the syntax."""
    _load_builtin()
    scheme, target = parse_name(name)
    if scheme not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY) + sorted(_ALIASES))
        raise UnknownEncoderError(f"unknown encoder {name!r}: scheme {scheme!r} is not registered "
                                  f"(known schemes: {known})")
    return _REGISTRY[scheme].loader(target, dict(options or {}))


def load_from_record(record: dict[str, Any]) -> Encoder:
    """Rebuild the encoder a collection was made with, from its stored JSON record."""
    return load_encoder(record["spec"], record.get("options") or {})


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators once.
    from caselens.ingest.encoders import classic, composite, model_files, onnx_text, open_clip_encoder, text  # noqa: F401
