"""One registry and one name syntax for generators, like the encoders' (``scheme[:target]``).

``extractive``, ``gemma``, ``hf:<model folder or hub name>``, ``openai:<base url>`` and ``auto``
(Gemma when its package is installed, else extractive). Loaders register with :func:`register`,
which rejects malformed schemes and second registrations; loaded generators are kept per name
for the process (models load once).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from caselens.errors import CaselensError

_SCHEME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
Loader = Callable[[str], Any]  # target -> Generator


class UnknownGeneratorError(CaselensError, KeyError):
    """A generator name that no registered scheme understands."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    summary: str  # one line for --help and `caselens generators`
    needs_target: bool  # "hf:" and "openai:" need one; "extractive" and "gemma" take none
    keep: bool  # keep the loaded generator for the process (models); endpoints are cheap to make


_REGISTRY: dict[str, _Entry] = {}
_LOADED: dict[str, Any] = {}
_LOCK = threading.Lock()


def register(scheme: str, summary: str, *, needs_target: bool = False, keep: bool = True) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(target) -> Generator`` under ``scheme``."""
    if not isinstance(scheme, str) or not _SCHEME_RE.fullmatch(scheme) or scheme == "auto":
        raise ValueError(f"generator scheme {scheme!r} must be lower-case letters, digits, '-' or '_' (not 'auto')")

    def decorate(loader: Loader) -> Loader:
        if scheme in _REGISTRY:
            raise ValueError(f"generator scheme {scheme!r} is already registered")
        if not callable(loader):
            raise TypeError(f"loader for generator {scheme!r} must be callable")
        _REGISTRY[scheme] = _Entry(loader, summary, needs_target, keep)
        return loader

    return decorate


def parse_name(name: str) -> tuple[str, str]:
    """Split a generator name into (scheme, target)."""
    scheme, _, target = name.strip().partition(":")
    return scheme.lower(), target


def available() -> dict[str, str]:
    """Registered schemes and their one-line summaries."""
    _load_builtin()
    return {k: v.summary for k, v in sorted(_REGISTRY.items())}


def load_generator(name: str = "auto") -> Any:
    """The generator called ``name`` (see the module docstring), loaded once per process."""
    _load_builtin()
    if name.strip() == "auto":
        from caselens.retrieval.rag.generators import gemma_available

        name = "gemma" if gemma_available() else "extractive"
    scheme, target = parse_name(name)
    entry = _REGISTRY.get(scheme)
    if entry is None:
        raise UnknownGeneratorError(f"unknown generator {name!r}: use auto, "
                                    + ", ".join(f"{s}:<…>" if e.needs_target else s for s, e in sorted(_REGISTRY.items())))
    if entry.needs_target and not target:
        raise UnknownGeneratorError(f"generator {scheme!r} needs a target: {scheme}:<…> ({entry.summary})")
    if not entry.needs_target and target:
        raise UnknownGeneratorError(f"generator {scheme!r} takes no target (got {name!r})")
    if not entry.keep:
        return entry.loader(target)
    with _LOCK:
        if name not in _LOADED:
            _LOADED[name] = entry.loader(target)
        return _LOADED[name]


def _load_builtin() -> None:
    # Importing the module runs its @register decorators once.
    from caselens.retrieval.rag import generators  # noqa: F401
