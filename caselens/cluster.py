"""Joining a Ray cluster: one place for the distributed ingest (:mod:`caselens.ingest.ray_runner`)
and the distributed index build (:mod:`caselens.indexes.ray_index`).

Ray is an optional dependency (``pip install 'caselens[ray]'``); :func:`ray_module` says how to get
it when it is missing instead of failing with an import error.
"""

from __future__ import annotations

import warnings
from typing import Any

from caselens.errors import RunnerError


def ray_module() -> Any:
    """The ``ray`` package with Ray Data, or :class:`RunnerError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RunnerError(f"this needs Ray Data ({exc.msg}): pip install 'caselens[ray]'") from None
    return ray


def connect(address: str | None = None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one running on this node; "ray://host:port":
    through Ray Client; None: start a local one) unless this process already is connected (then
    ``address`` and ``runtime_env`` are not applied)."""
    ray = ray_module()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    with warnings.catch_warnings():  # Ray starts its processes with fork+exec: no Lance runtime runs there
        warnings.filterwarnings("ignore", message="lancedb fork support")
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        ray.init(**kwargs)
