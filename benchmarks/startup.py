"""Cold start-up of the ``caselens`` command: ``--help``, ``search`` on a 1,000-image collection and
``ask --generator extractive`` on a small text collection, each a fresh process.

Each command runs ``--repeat`` times, the commands taking turns (so that load from other processes
falls on all of them alike); reported per command: wall time and CPU time (user + system of the
child process) as min / median / max. On a machine shared with other work, wall time is noisy
and CPU time is the steadier figure: a cold process on an idle machine takes about its CPU time.
The heaviest imports of each command (``python -X importtime``, cumulative) are listed too.

The collections are made once in ``--work`` (default: a folder under /tmp kept between runs):
1,000 images of ``../shared/data/images/retinamnist`` with the ``classic`` encoder, and the first
``--docs`` documents of ``../shared/data/corpus/pubmed_abstracts.jsonl`` with the default text
encoder. Without the shared data the search and ask rows are skipped.

    .venv/bin/python benchmarks/startup.py                       # writes benchmarks/results/startup.json
    .venv/bin/python benchmarks/startup.py --repeat 9 --out startup_quiet.json
    .venv/bin/python benchmarks/startup.py --baseline ../main/.venv/bin/caselens   # before/after, interleaved

``--baseline`` names another ``caselens`` executable (e.g. the main checkout's): every command
runs with both, in turn, and the result holds both side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, SHARED_DATA, log, write_result

CASELENS = [sys.executable, "-m", "caselens.cli"]


def _exe() -> list[str]:
    script = Path(sys.executable).parent / "caselens"
    return [str(script)] if script.exists() else CASELENS


def _python_of(exe: str) -> str:
    """The interpreter of a console script (its ``#!`` line)."""
    with open(exe) as fh:
        first = fh.readline()
    return first[2:].strip() if first.startswith("#!") else sys.executable


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status) of one cold run of ``cmd``."""
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if done.returncode != 0:
        log(f"  {' '.join(cmd[-6:])} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return wall, cpu, done.returncode


def heaviest_imports(cmd: list[str], env: dict[str, str], top: int = 12) -> list[dict[str, Any]]:
    """The modules with the largest cumulative import time in one run of ``cmd`` (top-level ones
    and the heaviest third-party packages)."""
    code = ("import sys, runpy; sys.argv = ['caselens'] + sys.argv[1:]; "
            "runpy.run_module('caselens.cli', run_name='__main__')")
    python = _python_of(cmd[0]) if cmd[0].endswith("caselens") else sys.executable
    done = subprocess.run([python, "-X", "importtime", "-c", code, *cmd[1:]], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    picked = [r for r in rows if r[1] <= 1 or r[2] in ("pandas", "numpy", "pyarrow", "lance", "faiss", "torch",
                                                         "PIL.Image", "pydicom", "transformers",
                                                         "sentence_transformers", "onnxruntime", "tqdm", "rich")]
    picked.sort(key=lambda r: -r[0])
    seen, out = set(), []
    for us, depth, name in picked:
        if name not in seen:
            seen.add(name)
            out.append({"module": name, "cumulative_ms": round(us / 1000, 1), "depth": depth})
        if len(out) >= top:
            break
    return out


def make_collections(work: Path, docs: int, env: dict[str, str]) -> dict[str, Path]:
    """The image and text collections under ``work/home`` (made once; skipped without the data)."""
    home = work / "home"
    made: dict[str, Path] = {}
    source = SHARED_DATA / "images" / "retinamnist"
    if (home / "retina").is_dir():
        made["image"] = next((work / "images").glob("*.png"))
    elif (source / "manifest.csv").exists():
        (work / "images").mkdir(parents=True, exist_ok=True)
        with open(source / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))[:1000]
        for row in rows:
            shutil.copyfile(source / row["path"], work / "images" / Path(row["path"]).name)
        with open(work / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label"])
            writer.writeheader()
            writer.writerows({"path": f"images/{Path(r['path']).name}", "label": r["label"]} for r in rows)
        log("ingesting 1,000 images (classic encoder)")
        subprocess.run([*_exe(), "--home", str(home), "ingest", "retina", "--manifest", str(work / "manifest.csv"),
                        "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        made["image"] = work / "images" / Path(rows[5]["path"]).name
    corpus = SHARED_DATA / "corpus" / "pubmed_abstracts.jsonl"
    if (home / "kb").is_dir():
        made["text"] = home / "kb"
    elif corpus.exists():
        with open(corpus) as fh, open(work / "docs.jsonl", "w") as out:
            for i, line in enumerate(fh):
                if i >= docs:
                    break
                out.write(line)
        log(f"ingesting {docs} documents (default text encoder)")
        subprocess.run([*_exe(), "--home", str(home), "ingest", "kb", "--text", str(work / "docs.jsonl"), "-q"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        made["text"] = home / "kb"
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="cold runs of each command (default 5)")
    p.add_argument("--docs", type=int, default=200, help="documents in the text collection (default 200)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "caselens-startup-bench"))
    p.add_argument("--baseline", help="another caselens executable to time the same way (before/after)")
    p.add_argument("--out", default="startup.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "0"}
    made = make_collections(work, args.docs, env)
    home = str(work / "home")
    commands: dict[str, list[str]] = {"help": [*_exe(), "--help"]}
    if "image" in made:
        commands["search"] = [*_exe(), "--home", home, "search", "retina", "--image", str(made["image"]), "--k", "5"]
    if "text" in made:
        commands["ask_extractive"] = [*_exe(), "--home", home, "ask", "kb", "What causes pneumonia?",
                                      "--generator", "extractive"]
    if args.baseline:
        for name, cmd in list(commands.items()):
            commands[f"{name}@baseline"] = [args.baseline, *cmd[1:]]
    for cmd in commands.values():  # compiled bytecode and the page cache warm: "cold" is a new process
        run_once(cmd, env)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for i in range(args.repeat):
        for name in list(commands)[i % len(commands):] + list(commands)[:i % len(commands)]:
            wall, cpu, _ = run_once(commands[name], env)
            times[name].append((wall, cpu))
        log(f"  round {i + 1}/{args.repeat}: " + ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in times.items()))
    result: dict[str, Any] = {"repeat": args.repeat, "targets_s": {"help": 0.5, "search": 2.0},
                              "baseline": args.baseline, "commands": {}}
    for name, cmd in commands.items():
        walls, cpus = [w for w, _ in times[name]], [c for _, c in times[name]]
        result["commands"][name] = {
            "command": " ".join(["caselens", *cmd[1:]]).replace(home, "HOME"),
            "wall_s": {"min": round(min(walls), 3), "median": round(statistics.median(walls), 3),
                       "max": round(max(walls), 3)},
            "cpu_s": {"min": round(min(cpus), 3), "median": round(statistics.median(cpus), 3),
                      "max": round(max(cpus), 3)},
            "heaviest_imports": heaviest_imports(cmd, env),
        }
        log(f"{name}: wall {result['commands'][name]['wall_s']}, cpu {result['commands'][name]['cpu_s']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
