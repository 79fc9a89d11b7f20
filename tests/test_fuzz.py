"""Fuzzing the readers (DICOM, DICOMDIR, images, PDFs, manifests, JSONL/CSV corpora): a short
bounded atheris run over every target, and the crashes fuzzing found, each now a rejection with a
reason. Longer runs: ``python benchmarks/fuzz/run.py --seconds 300``."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from caselens.ingest.items import Rejection
from caselens.ingest.sources.dicom import DicomOptions, decode_frames, decode_isolated, DicomReadError
from caselens.ingest.sources.image_folder import ImageSource

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "benchmarks" / "fuzz"


def _pydicom_file(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name)).read_bytes()


def test_short_fuzz_run_of_every_reader_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    sys.path.insert(0, str(FUZZ))
    try:
        from seeds import write_seeds
    finally:
        sys.path.remove(str(FUZZ))
    seeds, corpus = tmp_path / "seeds", tmp_path / "corpus"
    corpus.mkdir()
    assert write_seeds("all", seeds) > 10
    env = {**os.environ, "CASELENS_FUZZ_INSTRUMENT": "caselens", "RUST_BACKTRACE": "0"}
    got = subprocess.run([sys.executable, str(FUZZ / "harness.py"), "all", "-max_total_time=6", "-timeout=20",
                          "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds)],
                         capture_output=True, text=True, env=env, timeout=300)
    log = got.stdout + got.stderr
    assert got.returncode == 0, log[-3000:]
    assert "Done" in log and not list(tmp_path.glob("crash-*"))


def test_manifest_path_with_a_nul_byte_is_rejected(tmp_path: Path) -> None:
    # found by fuzzing: os.lstat raised ValueError("embedded null byte") out of the reader
    Image.new("L", (8, 8), 7).save(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_bytes(b'path,label\n"a.png\x00\x00",x\na.png,y\n')
    out = list(ImageSource(manifest=tmp_path / "manifest.csv", secret=KEY))
    assert [getattr(x, "reason_code", "item") for x in out] == ["bad_path", "item"]


def test_manifest_naming_a_column_twice_is_refused_clearly(tmp_path: Path) -> None:
    # found by fuzzing: columns were typed by position and read by name, so a header naming a
    # column twice made float("x") fail in the middle of an ingest
    from caselens.errors import SourceError

    (tmp_path / "manifest.csv").write_text("path,age,label,age\na.png,40,x,old\n")
    with pytest.raises(SourceError, match="more than once"):
        ImageSource(manifest=tmp_path / "manifest.csv", secret=KEY)


def test_rle_decoder_panic_is_a_rejection(tmp_path: Path) -> None:
    # found by fuzzing: one byte inserted into an RLE segment makes pylibjpeg-rle (Rust) panic, and
    # pyo3's PanicException derives from BaseException: it went past `except Exception`
    seed = _pydicom_file("MR_small_RLE.dcm")
    (tmp_path / "IM1").write_bytes(seed[:1882] + b"\xf1" + seed[1882:])
    with pytest.raises(DicomReadError) as info:
        decode_frames(tmp_path / "IM1", KEY, DicomOptions())
    assert info.value.code in ("corrupt_dicom", "undecodable_pixels")


def test_header_values_damaged_past_the_first_read_are_rejections(tmp_path: Path) -> None:
    # found by fuzzing: pydicom converts a value when it is first read, so an unknown VR in
    # Modality raised NotImplementedError after the guarded header read (scan and series units
    # crashed); a wrong-length group length in a DICOMDIR's file meta raised BytesLengthException
    from caselens.errors import SourceError
    from caselens.ingest.dicom_scan import header_of, scan, walk_inputs
    from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig

    export = tmp_path / "export"
    export.mkdir()
    (export / "IM1").write_bytes(_pydicom_file("CT_small.dcm").replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00C["))
    found = header_of(export / "IM1", "IM1", KEY, DicomOptions())
    assert isinstance(found, Rejection) and found.reason_code == "corrupt_dicom"
    assert scan(export, KEY).summary()["unreadable"] == 1
    codes = [getattr(x, "reason_code", "item") for x in DicomSource(export, KEY, DicomSourceConfig(unit="series"))]
    assert codes == ["corrupt_dicom"]
    from pydicom.data import get_testdata_file

    dicomdir = Path(get_testdata_file("DICOMDIR")).read_bytes()
    (tmp_path / "DICOMDIR").write_bytes(dicomdir.replace(b"\x02\x00\x00\x00UL\x04\x00", b"\x02\x00\x00\x00UN\x04\x00", 1))
    with pytest.raises(SourceError, match="DICOMDIR .* cannot be read"):
        list(walk_inputs(tmp_path / "DICOMDIR"))


def test_decoder_that_aborts_the_process_rejects_the_file_instead() -> None:
    # found by fuzzing: damaged JPEG data makes GDCM throw a C++ exception nobody catches
    # (std::terminate: the whole ingest died). GDCM now runs last, in a child process.
    data = base64.b64decode(GDCM_ABORT)
    with pytest.raises(DicomReadError) as info:
        decode_isolated(data, "gdcm", timeout_s=60)
    assert info.value.code == "decoder_crashed"
    # the parent is alive and decodes the next file as before
    assert decode_isolated(_pydicom_file("CT_small.dcm"), "gdcm", timeout_s=60).shape == (128, 128)


def test_fuzz_targets_accept_the_seeds() -> None:
    sys.path.insert(0, str(FUZZ))
    try:
        import seeds
        import targets
    finally:
        sys.path.remove(str(FUZZ))
    for name, fn in targets.TARGETS.items():
        for data in seeds.SEEDS[name]():
            fn(data)  # a crash here would raise
    assert isinstance(Rejection("x", "c", "r"), Rejection)


GDCM_ABORT = (  # a JPEG baseline DICOM file found by fuzzing, minimised (775 bytes): GDCM aborts on it
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABESUNNAgAAAFVMBADUAAAAAgABAE9C"
    "AAACAAAAAAECAAIAVUkaADEuMi44NDAuMTAwMDguNS4xLjQuMS4xLjcAAgADAFVJQAAxLjIuODI2LjAuMS4zNjgwMDQzLjguNDk4"
    "LjEzMDAyODExMTg1MDg2NjM3NjM3MzQ3MzU2MjYzNzIyNDkyOTI0AgAQAFVJFgAxLjIuODQwLjEwMDA4LjEuMi40LjUwAgASAFVJ"
    "HgAxLjIuODI2LjAuMS4zNjgwMDRIRVIgCAAwAAAAAAAIADMADgAAADAzMDMwOC4wNTYwMjEgCABQAAAAAAAIAGAAAgAAAE9UCABk"
    "AAIAAABESQgAcAAGAAAAZGVidWcgCACQAAAAAAAgAA0AQAAAADEuMi44MjYuMC4xLjM2ODAwNDMuOC40OTguMTMzMzExNzkxMDg0"
    "MDMyMzYwODQwMzk4MzgxMjM0MTc4MDY1ODQgAA4AQAAAADEuMi44MjYuMC4xLjM2ODAwNDMuOC40OTguMTI4OTAwMjE2MjQ3NjI0"
    "ODY3Mzc5MTI3MTM2NDc2NDczMjgzMzkgABAAAAAAACAAEQACAAAAMSAgABMAAgAAADEgKAACAAIAAAADACgABAAEAAAAUkdCICgA"
    "BgACAAAAAAAoABAAAgAAAAABKAARAAIAAAAAASgAAAECAAAACAAoAAEBAgAAAAgAKAACAQIAAAAHACgAAwECAAAAAAAoABAhAgAA"
    "ADAxKAASIQIAAAAxMCgAFCEMAAAASVNPXzEwOTE4XzEg4H8QAP/////+/wDgAAAAAP7/AOCqDQAA/9j/7gAMQWRvYmUAAAAAAP/T"
    "1NXy8/T19vf4+fr/wAARCAEA/v/d4AAAAA=="
)
