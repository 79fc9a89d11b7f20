"""Crasher: `caselens` writers killed with SIGKILL again and again, invariants checked after each restart.

In the style of Qdrant's crasher: each *path* (ingest of images, DICOM and text; index rebuild;
optimize) runs as a subprocess of the worktree's ``caselens`` command and is killed with SIGKILL

* at a random time drawn *after start-up*: the clock starts when the process reaches its first
  fault point (``lock.acquired``, noted in ``CASELENS_FAULT_TRACE``), so no kill is wasted on
  imports, and the delay is drawn uniformly over the work a clean run does after that point;
* at a named fault point (:mod:`caselens.faults`: ``CASELENS_FAULT=name:nth``): before/after the
  table commit, before/after the ledger write, before/after compaction, between the FAISS index
  and its stamp, and just before an atomic file rename (index, stamp).

An *episode* starts from a fresh state, kills the command one to three times in a row (each
restart continues from what the previous kill left), then lets it complete. After every kill the
quick invariants are checked through LanceDB (no item twice, nothing unexpected, no ledger row
accepting an item the table lacks, and for index/optimize the table untouched); after the
completing run the full ones: every expected item exactly once with its reference vector, no
phantom rows (table rows without an accepted ledger row), the final run's ledger names every
input, and verify is ok (ledger and table agree, index and table agree, each item finds itself):
``caselens verify --json`` every fourth episode, the same library call
(``Collection.verify``) in this process otherwise, to spare a process start-up.

    python benchmarks/crasher.py --mode full     # >= 200 kills, fixed seeds -> benchmarks/results/crasher.json
    python benchmarks/crasher.py --mode ci       # a handful of kills (tests/test_crasher.py)

Kills per path, and per path survived / lost / duplicated / phantom, are in the results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "crasher.json"
CASELENS = str(Path(sys.executable).parent / "caselens")
INGEST_POINTS = ["table.commit.before", "table.commit.after", "ledger.write.before", "ledger.write.after",
                 "table.compact.before", "table.compact.after", "index.write.between", "file.rename.before"]
INDEX_POINTS = ["index.write.between", "file.rename.before"]
OPTIMIZE_POINTS = ["table.compact.before", "table.compact.after", "index.write.between", "file.rename.before"]


# ------------------------------------------------------------------ inputs
def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (40, 40), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
    return folder


def make_dicom_export(folder: Path) -> Path:
    import pydicom.data

    src = Path(pydicom.data.__file__).parent / "test_files"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
             "SC_rgb_jpeg_gdcm.dcm", "examples_palette.dcm", "examples_ybr_color.dcm", "rtdose.dcm",
             "liver_1frame.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd.dcm", "rtplan.dcm",
             "MR_truncated.dcm", "README.txt"]
    for i, name in enumerate(names):
        shutil.copy(src / name, folder / f"IM{i:03d}")
    shutil.copytree(src / "dicomdirtests" / "77654033", folder / "tiny")
    return folder


def make_corpus(path: Path, n: int) -> Path:
    topics = ["pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "atelectasis", "nodule"]
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"doc{i}", "text": f"Note {i}: findings consistent with "
                                 f"{topics[i % len(topics)]} in the {['left', 'right'][i % 2]} lung, case {i}."}) + "\n")
    return path


def make_vector_collection(home: Path, n: int, dim: int, adds: int) -> None:
    """A collection of ``n`` random unit vectors written in ``adds`` appends (one fragment each),
    with its ledger and a FAISS index: the starting state of the index and optimize paths."""
    from caselens.indexes import derived
    from caselens.indexes.collection import Collection, LedgerEntry

    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    record = {"spec": "test:vectors", "dim": dim, "modalities": ["image"], "fingerprint": "c" * 16, "options": {}}
    coll = Collection.create("col", record, home)
    step = -(-n // adds)
    for start in range(0, n, step):
        ids = range(start, min(n, start + step))
        coll.add([{"id": f"v{i}", "kind": "image", "source": f"v{i}", "metadata": {"group": f"g{i % 7}"}}
                  for i in ids], vecs[start:start + len(ids)])
        coll.record("base", [LedgerEntry(f"v{i}", "accepted", f"v{i}") for i in ids])
    derived.refresh(coll, rebuild=True)


# ------------------------------------------------------------------ state
@dataclass
class State:
    ids: list[str]
    vectors: dict[str, np.ndarray]
    accepted: set[str]
    ledger: list[dict]

    @property
    def id_set(self) -> set[str]:
        return set(self.ids)


def read_state(home: Path) -> State:
    """The collection ``col`` under ``home`` read with Lance directly (empty when not made yet)."""
    from caselens.indexes.lance_lib import lance

    folder = home / "col" / "lance"
    if not (folder / "items.lance").exists():
        return State([], {}, set(), [])
    items = lance.dataset(str(folder / "items.lance")).to_table(columns=["id", "vector"])
    ids = items.column("id").to_pylist()
    flat = np.asarray(items.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
    dim = flat.size // max(1, len(ids))
    vectors = dict(zip(ids, flat.reshape(-1, dim) if ids else []))
    ledger = lance.dataset(str(folder / "ledger.lance")).to_table().to_pylist() if (folder / "ledger.lance").exists() else []
    accepted = {r["item_id"] for r in ledger if r["status"] == "accepted" and r["item_id"]}
    return State(ids, vectors, accepted, ledger)


# ------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    name: str  # e.g. "ingest-images"
    path: str  # "ingest", "index" or "optimize"
    args: list[str]  # the caselens command after --home
    points: list[str]  # named fault points to kill at
    prepare: Callable[[Path], None]  # makes the starting state of an episode in a fresh home
    inputs: int = 0  # inputs the final run's ledger must name (ingest paths)
    reference: State | None = None  # what a clean run stores
    work_s: float = 2.0  # seconds a clean run works after its first fault point
    hits: dict[str, int] = field(default_factory=dict)  # fault point -> times a clean run passes it


@dataclass
class Run:
    exit: int | None
    killed: bool
    seconds: float  # start to exit
    ready_s: float | None  # start to the first fault point (None: never reached)
    trace: list[str]
    stderr: str


def run_caselens(home: Path, args: list[str], trace: Path, fault: str | None = None,
                 kill_after: float | None = None, timeout: float = 600) -> Run:
    """One ``caselens`` process: killed at ``fault`` (by itself) or ``kill_after`` seconds after its
    first fault point (by us), or left to finish."""
    trace.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CASELENS_FAULT_TRACE": str(trace),
           "PYTHONUNBUFFERED": "1"}
    env.pop("CASELENS_FAULT", None)
    if fault:
        env["CASELENS_FAULT"] = fault
    err_path = trace.with_suffix(".err")
    start = time.monotonic()
    with err_path.open("w") as err:
        proc = subprocess.Popen([CASELENS, "--home", str(home), *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, start_new_session=True)
    killed, ready = False, None
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            now = time.monotonic()
            if ready is None and trace.exists() and trace.stat().st_size:
                ready = now
            if ready is not None and kill_after is not None and now - ready >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # decoding workers left behind by a self-kill
        except ProcessLookupError:
            pass
    end = time.monotonic()
    killed = killed or proc.returncode == -signal.SIGKILL
    lines = trace.read_text().split("\n") if trace.exists() else []
    points = [ln.split(" ", 1)[1] for ln in lines if " " in ln]
    return Run(proc.returncode, killed, end - start, None if ready is None else ready - start, points,
               err_path.read_text()[-600:])


def calibrate(scenario: Scenario, work: Path) -> None:
    """A clean run from the episode's starting state: the reference result, the time it works after
    its first fault point (random kills are drawn in it), and how often each point is passed."""
    home = work / f"calibrate-{scenario.name}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    scenario.prepare(home)
    run = run_caselens(home, scenario.args, work / f"calibrate-{scenario.name}.trace")
    if run.exit != 0:
        raise RuntimeError(f"{scenario.name}: clean run failed ({run.exit}): {run.stderr}")
    scenario.reference = read_state(home)
    scenario.hits = {p: run.trace.count(p) for p in sorted(set(run.trace))}
    scenario.work_s = max(0.2, run.seconds - (run.ready_s or 0.0))
    shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------ checks
def quick_check(scenario: Scenario, state: State, base: State | None) -> list[str]:
    """Invariants that hold at any time, even right after a kill."""
    problems = []
    if len(state.ids) != len(state.id_set):
        problems.append(f"{len(state.ids) - len(state.id_set)} items stored twice")
    ref = scenario.reference
    if ref is not None and scenario.path == "ingest":
        extra = state.id_set - ref.id_set
        if extra:
            problems.append(f"{len(extra)} unexpected items")
    lost = state.accepted - state.id_set
    if scenario.path == "ingest" and lost:
        problems.append(f"{len(lost)} ledger-accepted items missing from the table")
    if base is not None and scenario.path != "ingest":
        if state.id_set != base.id_set:
            problems.append(f"table changed: {len(base.id_set - state.id_set)} lost, "
                            f"{len(state.id_set - base.id_set)} new")
        elif any(not np.array_equal(state.vectors[i], v) for i, v in base.vectors.items()):
            problems.append("a vector changed")
        if len(state.ledger) != len(base.ledger):
            problems.append("ledger changed")
    return problems


def verify(home: Path, in_process: bool) -> dict:
    if in_process:
        from caselens.indexes import derived
        from caselens.indexes.collection import Collection

        return derived.verify(Collection.open("col", home)).to_dict()
    got = subprocess.run([CASELENS, "--home", str(home), "verify", "col", "--json"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    try:
        return json.loads(got.stdout)
    except ValueError:
        return {"ok": False, "error": got.stderr[-400:]}


def full_check(scenario: Scenario, home: Path, base: State | None, final_run_id: str | None,
               in_process: bool) -> dict:
    """Invariants after a completing run."""
    state = read_state(home)
    ref = scenario.reference if scenario.path == "ingest" else base
    assert ref is not None
    counts: dict[str, int] = {}
    for i in state.ids:
        counts[i] = counts.get(i, 0) + 1
    lost = sorted(ref.id_set - state.id_set)
    duplicated = sorted(i for i, c in counts.items() if c > 1)
    unexpected = sorted(state.id_set - ref.id_set)
    phantom = sorted(state.id_set - state.accepted)
    changed = sorted(i for i in state.id_set & ref.id_set
                     if not np.allclose(state.vectors[i], ref.vectors[i], atol=1e-6))
    report = verify(home, in_process)
    out = {"lost": len(lost), "duplicated": len(duplicated), "unexpected": len(unexpected), "phantom": len(phantom),
           "vectors_changed": len(changed), "verify_ok": bool(report.get("ok")),
           "verify": {k: report.get(k) for k in ("items", "expected", "missing_count", "duplicated_count",
                                                  "bad_vectors", "index_problems", "self_checked", "self_missed",
                                                  "error") if k in report}}
    if scenario.path == "ingest" and final_run_id:
        rows = [r for r in state.ledger if final_run_id in _runs_of(r)]  # one row per input and outcome
        out["final_run_inputs"] = len({r["input"] for r in rows})
        out["inputs_accounted"] = out["final_run_inputs"] == scenario.inputs
    out["ok"] = (not (lost or duplicated or unexpected or phantom or changed) and out["verify_ok"]
                 and out.get("inputs_accounted", True))
    return out


def _runs_of(row: dict) -> set[str]:
    """The runs a ledger row names: the first that met its input and outcome, and the last."""
    return {row["run_id"], row.get("last_run") or row["run_id"]}


def last_run_id(home: Path, before: set[str]) -> str | None:
    runs = sorted(((r.get("last_time") or r["time"], run) for r in read_state(home).ledger
                   for run in _runs_of(r) - before), key=lambda t: t[0])
    return runs[-1][1] if runs else None


# ------------------------------------------------------------------ the loop
def draw_kill(scenario: Scenario, rng: np.random.Generator) -> dict:
    """A named fault point (and which passage of it) or a random delay after start-up, half and half."""
    usable = [p for p in scenario.points if scenario.hits.get(p)]
    if usable and rng.random() < 0.5:
        point = str(rng.choice(usable))
        return {"kind": "point", "point": point, "nth": int(rng.integers(1, min(4, scenario.hits[point]) + 1))}
    return {"kind": "random", "delay_s": round(float(rng.uniform(0, scenario.work_s)), 3)}


def run_scenario(scenario: Scenario, work: Path, kills_wanted: int, seed: int, cli_verify_every: int = 0,
                 max_kills_per_episode: int = 4, log: Callable[[str], None] = print,
                 fixed: list[list[dict]] | None = None) -> dict:
    """Episodes of kills (drawn with ``seed`` until ``kills_wanted`` processes were killed, or the
    ``fixed`` episodes given) each followed by a completing run and the checks."""
    rng = np.random.default_rng(seed)
    kills: list[dict] = []
    episodes: list[dict] = []
    attempts = 0
    plans = iter(fixed) if fixed is not None else None
    while True:
        if plans is not None:
            plan = next(plans, None)
            if plan is None:
                break
        elif len([k for k in kills if k["killed"]]) >= kills_wanted or attempts >= kills_wanted * 4:
            break
        else:
            plan = [draw_kill(scenario, rng) for _ in range(int(rng.integers(2, max_kills_per_episode + 1)))]
        home = work / f"{scenario.name}-ep{len(episodes)}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        scenario.prepare(home)
        base = read_state(home) if scenario.path != "ingest" else None
        episode = {"episode": len(episodes), "kills": 0, "quick_problems": []}
        for spec in plan:
            if plans is None and len([k for k in kills if k["killed"]]) >= kills_wanted:
                break
            attempts += 1
            if spec["kind"] == "point":
                run = run_caselens(home, scenario.args, work / "trace", fault=f"{spec['point']}:{spec['nth']}")
            else:
                run = run_caselens(home, scenario.args, work / "trace", kill_after=spec["delay_s"])
            state = read_state(home)
            problems = quick_check(scenario, state, base)
            if not run.killed and run.exit not in (0, None):
                problems.append(f"exit {run.exit}: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}")
            entry = {"scenario": scenario.name, "episode": len(episodes), **spec, "killed": run.killed,
                     "exit": run.exit, "last_point": run.trace[-1] if run.trace else None,
                     "points_passed": len(run.trace), "problems": problems}
            kills.append(entry)
            episode["kills"] += int(run.killed)
            episode["quick_problems"] += problems
            if problems:
                log(f"  {scenario.name}: PROBLEM after {spec}: {problems}")
        before = {run for r in read_state(home).ledger for run in _runs_of(r)}
        final = run_caselens(home, scenario.args, work / "trace")
        episode["final_exit"] = final.exit
        if final.exit != 0:
            episode["final_error"] = final.stderr.strip()[-400:]
        run_id = last_run_id(home, before) if scenario.path == "ingest" else None
        use_cli = bool(cli_verify_every) and len(episodes) % cli_verify_every == 0
        episode["verify_by"] = "cli" if use_cli else "library"
        episode["check"] = full_check(scenario, home, base, run_id, in_process=not use_cli)
        episode["ok"] = final.exit == 0 and episode["check"]["ok"] and not episode["quick_problems"]
        episodes.append(episode)
        killed = sum(1 for k in kills if k["killed"])
        log(f"  {scenario.name}: episode {episode['episode']}: {episode['kills']} kill(s), "
            f"{'ok' if episode['ok'] else 'FAILED ' + json.dumps(episode['check'])} ({killed}/{kills_wanted} kills)")
        shutil.rmtree(home, ignore_errors=True)
    killed_entries = [k for k in kills if k["killed"]]
    ok_episodes = {e["episode"] for e in episodes if e["ok"]}
    return {
        "scenario": scenario.name, "path": scenario.path, "seed": seed, "work_s": round(scenario.work_s, 2),
        "kills": len(killed_entries),
        "kills_at_points": sum(1 for k in killed_entries if k["kind"] == "point"),
        "kills_at_random_times": sum(1 for k in killed_entries if k["kind"] == "random"),
        "runs_finished_before_kill": sum(1 for k in kills if not k["killed"]),
        "episodes": len(episodes),
        "survived": sum(1 for k in killed_entries if k["episode"] in ok_episodes and not k["problems"]),
        "lost": sum(e["check"]["lost"] for e in episodes),
        "duplicated": sum(e["check"]["duplicated"] for e in episodes),
        "phantom": sum(e["check"]["phantom"] for e in episodes),
        "vectors_changed": sum(e["check"]["vectors_changed"] for e in episodes),
        "verify_failed": sum(1 for e in episodes if not e["check"]["verify_ok"]),
        "quick_check_problems": sum(len(k["problems"]) for k in kills),
        "points_hit": {p: sum(1 for k in killed_entries if k.get("point") == p) for p in scenario.points},
        "random_kills_last_point": _count(k["last_point"] for k in killed_entries if k["kind"] == "random"),
        "episode_details": episodes,
        "kill_details": kills,
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def scenarios(work: Path, mode: str) -> list[Scenario]:
    small = mode == "ci"
    images = make_images(work / "inputs" / "images", 24 if small else 60)
    dicom = make_dicom_export(work / "inputs" / "dicom")
    corpus = make_corpus(work / "inputs" / "corpus.jsonl", 40 if small else 120)
    template = work / "inputs" / "vectors"
    make_vector_collection(template, 3000 if small else 20000, 32, 12 if small else 40)
    n_dicom = sum(1 for p in dicom.rglob("*") if p.is_file() and not p.name.startswith("."))

    def empty(home: Path) -> None:
        pass

    def vectors(home: Path) -> None:
        shutil.copytree(template / "col", home / "col")

    ingest = ["-q", "--batch-size", "2", "--write-items", "4"]
    ivf = ["--factory", "IVF16,SQ8" if small else "IVF64,SQ8"]
    return [
        Scenario("ingest-images", "ingest", ["ingest", "col", "--images", str(images), *ingest], INGEST_POINTS, empty,
                 inputs=len(list(images.glob("*.png")))),
        Scenario("ingest-dicom", "ingest", ["ingest", "col", "--dicom", str(dicom), *ingest], INGEST_POINTS, empty,
                 inputs=n_dicom),
        Scenario("ingest-text", "ingest", ["ingest", "col", "--text", str(corpus), "-q", "--batch-size", "8",
                                           "--write-items", "16"], INGEST_POINTS, empty,
                 inputs=sum(1 for _ in corpus.open())),
        Scenario("index-rebuild", "index", ["index", "col", "--rebuild", "-q", *ivf], INDEX_POINTS, vectors),
        Scenario("optimize", "optimize", ["optimize", "col", "--force", *ivf], OPTIMIZE_POINTS, vectors),
    ]


PLANS = {  # kills per scenario, and the seed of each, per mode
    "full": {"ingest-images": (50, 101), "ingest-dicom": (40, 202), "ingest-text": (30, 303),
             "index-rebuild": (45, 404), "optimize": (45, 505)},
    "ci": {"ingest-images": (2, 11), "index-rebuild": (1, 44), "optimize": (1, 55)},
}
# ci mode: fixed kills, no calibration run (the references are computed in this process)
CI_KILLS = {
    "ingest-images": [[{"kind": "point", "point": "table.commit.after", "nth": 2},
                       {"kind": "random", "delay_s": 0.4}]],
    "index-rebuild": [[{"kind": "point", "point": "file.rename.before", "nth": 1}]],
    "optimize": [[{"kind": "point", "point": "table.compact.after", "nth": 1}]],
}


def reference_in_process(scenario: Scenario, images: Path) -> None:
    """What a clean ingest of the image folder stores (ids and vectors), computed here with the
    same reader and encoder: the reference of ci mode, without a calibration run."""
    from caselens.ingest.encoders import load_encoder
    from caselens.ingest.items import Item
    from caselens.ingest.sources.image_folder import ImageSource

    items = [x for x in ImageSource(images, secret=bytes(range(32))) if isinstance(x, Item)]
    vectors = load_encoder("classic").encode_images([x.image for x in items])
    ids = [x.id for x in items]
    scenario.reference = State(ids, dict(zip(ids, np.asarray(vectors, np.float32))), set(ids), [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(PLANS), default="full")
    p.add_argument("--only", help="comma-separated scenario names (default: all of the mode's plan)")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/crasher.json; "
                                               "ci mode writes nothing unless given)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    plan = PLANS[args.mode]
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        results = []
        for scenario in scenarios(work, args.mode):
            if scenario.name not in plan:
                continue
            kills, seed = plan[scenario.name]
            fixed = None
            if args.mode == "ci":
                fixed = CI_KILLS[scenario.name]
                if scenario.path == "ingest":
                    reference_in_process(scenario, work / "inputs" / "images")
            else:
                calibrate(scenario, work)
                print(f"{scenario.name}: clean run works {scenario.work_s:.2f}s after start-up; points "
                      f"{scenario.hits}", flush=True)
            results.append(run_scenario(scenario, work, kills, seed, cli_verify_every=0 if args.mode == "ci" else 4,
                                        log=lambda m: print(m, flush=True), fixed=fixed))
    by_path: dict[str, dict[str, int]] = {}
    for r in results:
        agg = by_path.setdefault(r["path"], {"kills": 0, "survived": 0, "lost": 0, "duplicated": 0, "phantom": 0})
        for key in agg:
            agg[key] += r[key]
    summary = {"mode": args.mode, "seconds": round(time.time() - started, 1), "kills": sum(r["kills"] for r in results),
               "survived": sum(r["survived"] for r in results), "by_path": by_path,
               "by_scenario": {r["scenario"]: {k: r[k] for k in ("kills", "kills_at_points", "kills_at_random_times",
                                                                  "survived", "lost", "duplicated", "phantom",
                                                                  "vectors_changed", "verify_failed")}
                               for r in results},
               "note": "shared 2-core machine: timings noisy; kill times are drawn after start-up"}
    out = Path(args.out) if args.out else (RESULTS if args.mode == "full" else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "scenarios": results}, indent=1) + "\n")
        print(f"wrote {out}")
    print(json.dumps(summary, indent=2))
    return 0 if summary["kills"] == summary["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
