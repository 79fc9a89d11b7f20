"""atheris harness: ``python benchmarks/fuzz/harness.py TARGET [libFuzzer options] [CORPUS_DIR ...]``.

TARGET is one of the functions of ``targets.py`` (dicom, dicomdir, image, pdf, manifest, jsonl,
csv) or ``all`` (the first byte of each input picks the target). caselens and pydicom are
instrumented for coverage (``CASELENS_FUZZ_INSTRUMENT``, comma-separated, chooses). A crash is
any exception that is not a rejection with a reason (see ``targets.py``); libFuzzer then stops,
prints the Python traceback and writes the input to ``crash-<sha1>`` (or ``-artifact_prefix=``). ``run.py`` drives this for each reader and writes
the results JSON.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

# packages instrumented for coverage feedback (pydicom makes start-up slow: short runs leave it out)
INSTRUMENT = [p for p in os.environ.get("CASELENS_FUZZ_INSTRUMENT", "caselens,pydicom").split(",") if p]

with atheris.instrument_imports(include=INSTRUMENT):
    import targets  # noqa: E402  (the readers are imported lazily inside the targets)
    from caselens.ingest import dicom_scan  # noqa: F401
    from caselens.ingest.sources import dicom, dicom_source, image_folder, pdf, text_corpus  # noqa: F401
    import pydicom  # noqa: F401
    import pydicom.pixels  # noqa: F401


def main() -> None:
    if len(sys.argv) < 2 or (sys.argv[1] not in targets.TARGETS and sys.argv[1] != "all"):
        sys.exit(f"usage: harness.py {{{'|'.join([*targets.TARGETS, 'all'])}}} [libFuzzer options] [corpus ...]")
    name = sys.argv.pop(1)
    target = targets.any_target if name == "all" else targets.TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
