"""Start-up: a search imports neither pandas nor what only other commands need, and pandas keeps
working as usual once something imports it."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_search_path_imports_no_pandas_nor_other_commands_modules() -> None:
    out = _run("import sys, caselens.api, caselens.retrieval.search; "
               "print(','.join(m for m in ('pandas', 'tqdm', 'caselens.ingest.pipeline', 'caselens.retrieval.rag', "
               "'caselens.retrieval.eval', 'pyarrow.parquet', 'torch') if m in sys.modules))")
    assert out == ""


def test_pyarrow_converts_pandas_objects_as_usual_after_the_storage_layer_is_imported() -> None:
    convert = "print(pa.array(pd.Series(pd.Categorical(['a', 'b', 'a']))).type); " \
              "print(pa.table({'x': [1, 2]}).to_pandas()['x'].sum())"
    later = _run("import caselens.indexes.collection, sys; assert 'pandas' not in sys.modules; "
                 "import pandas as pd, pyarrow as pa; " + convert)
    first = _run("import pandas as pd, pyarrow as pa, caselens.indexes.collection; " + convert)
    assert later == first and first.startswith("dictionary<") and first.endswith("3")
