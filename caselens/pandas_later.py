"""Import a library without importing pandas along with it (start-up time).

``import lance`` imports ``pyarrow.dataset``, whose module set-up calls ``pyarrow.scalar()``,
which asks pyarrow's lazy pandas shim whether pandas is installed -- and the shim imports pandas
to find out: about a second of every cold ``caselens`` command, for a library no search needs.
:func:`without_pandas` keeps pandas out while such a module is imported: the shim then notes
"no pandas". pyarrow looks again whenever it needs pandas for a conversion (``to_pandas()``,
``from_pandas()``), and so that its other checks (``pyarrow.array`` of a pandas Series) behave
as usual too, the first real ``import pandas`` after that, by anyone, tells the shim at once.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any


class _KeepOut(importlib.abc.MetaPathFinder):
    """Refuses ``import pandas`` (while a library that does not need it is imported)."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError("pandas is imported when it is used", name=name)
        return None


class _TellPyarrow(importlib.abc.MetaPathFinder):
    """On the first real ``import pandas``: let it happen, then have pyarrow's shim import it too."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "pandas":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module: ModuleType) -> None:
            run(module)
            try:  # pyarrow's shim retries on a property that needs pandas: it finds it now
                import pyarrow.lib

                pyarrow.lib._pandas_api.pd  # noqa: B018
            except Exception:  # an older or newer pyarrow: it looks again when it converts
                pass

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextmanager
def without_pandas() -> Iterator[None]:
    """Imports in this block do not import pandas (nothing changes when it is imported already)."""
    if "pandas" in sys.modules or "pyarrow._dataset" in sys.modules:
        yield
        return
    keep_out = _KeepOut()
    sys.meta_path.insert(0, keep_out)
    try:
        yield
    finally:
        sys.meta_path.remove(keep_out)
        if "pandas" not in sys.modules and not any(isinstance(f, _TellPyarrow) for f in sys.meta_path):
            sys.meta_path.insert(0, _TellPyarrow())
