"""Kill a run with SIGKILL at random points of every stage, rerun it, and check that the result is the
uninterrupted run's, bit for bit, and that no process of the killed run is left behind.

    python tools/kill_resume.py [EXPERIMENT.yaml] [--set KEY=VALUE ...] [--kills 2] [--seed 0] [--work DIR]

1. Runs the experiment once, uninterrupted, into ``WORK/reference`` and reads each stage's duration from
   its completion record.
2. For every stage and every kill: starts the run into a fresh ``WORK/kill-<stage>-<k>`` (its own process
   session), waits until the log says the stage started, sleeps a random share (keyed by ``--seed``, the
   stage and k) of the stage's reference duration, and kills the whole session (parent and CRF workers)
   with SIGKILL; then checks that no process of the session is alive after ``--grace`` seconds, reruns
   the same command to the end, and compares every artifact with the reference:
   checkpoints (tensors), score caches (arrays), prediction PNGs (pixels), search and metric JSON (all but
   timings). Where a kill landed after the stage ended, the table says in which stage it landed.
3. Prints a table (stage, kill time, where it landed, processes left, artifacts compared, differences) and
   a summary line; exits 1 if any rerun differs or any process outlived its run.

The default experiment is the shipped one, shrunk with ``--set`` values to seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "test", "crf_search", "crf", "evaluate")
#: Keys of JSON outputs that hold wall-clock measurements, not results.
TIMING_KEYS = ("seconds", "time", "elapsed", "per_s", "started", "finished", "wall")
#: A small but complete pipeline on the shipped sample (every stage runs for a few seconds).
QUICK = ["train.iterations=4", "train.batch_size=1", "train.crop_size=81", "train.checkpoint_every=1",
         "data.max_test_images=3", "test.size=97", "crf_search.num_images=2", "crf_search.w1=[4, 5]",
         "crf_search.sigma_alpha=[50]", "crf_search.sigma_beta=[3, 5]", "crf_search.rounds=1",
         "crf.workers=2", "crf_search.workers=2", "evaluation.trimap_widths=[1, 4]"]


def _command(experiment: Path, overrides: list[str], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "deeplab_v1.cli", "run", str(experiment), "--no-progress"]
    for o in overrides + [f"output_dir={out}"]:
        cmd += ["--set", o]
    return cmd


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid`` (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _log_has(run_dir: Path, text: str) -> bool:
    try:
        return text in (run_dir / "run.log").read_text()
    except OSError:
        return False


def _landed(run_dir: Path) -> str:
    """The last stage the log says started (where the kill landed), or 'end' when the run had finished."""
    try:
        log = (run_dir / "run.log").read_text()
    except OSError:
        return "before train"
    lines = log.strip().splitlines()
    if lines and "report:" in lines[-1]:
        return "end"
    started = [s for s in STAGES if f"stage {s}: start" in log]
    return started[-1] if started else "before train"


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _artifacts(run_dir: Path) -> dict[str, Path]:
    """The run's results: checkpoints, score caches, predictions, search and metric JSON (not logs,
    stage records, locks, figures or the report, which hold times and paths)."""
    out = {}
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        if not p.is_file() or p.name.startswith("."):
            continue
        top = rel.split("/")[0]
        if top in ("checkpoints", "scores", "predictions") or rel.startswith("crf_search/") and p.suffix in (
                ".json", ".jsonl", ".txt", ".npz") or rel in ("metrics.json", "trimap.json"):
            out[rel] = p
    return out


def _same(a: Path, b: Path) -> bool:
    if a.suffix == ".pth":
        import torch

        x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        return _same_state(x, y)
    if a.suffix == ".npz":
        with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
            return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    if a.suffix == ".json":
        return _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text()))
    if a.suffix == ".jsonl":
        rows = [[_strip(json.loads(line)) for line in p.read_text().splitlines() if line.strip()] for p in (a, b)]
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731 - the order of finished configs may vary
        return sorted(rows[0], key=key) == sorted(rows[1], key=key)
    if a.suffix == ".png":
        from PIL import Image

        return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    return a.read_bytes() == b.read_bytes()


def _same_state(x: Any, y: Any) -> bool:
    import torch

    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_state(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(_same_state, x, y))
    return x == y


def compare(reference: Path, other: Path) -> tuple[int, list[str]]:
    """(number of artifacts compared, the relative paths that differ or are missing / extra)."""
    ref, got = _artifacts(reference), _artifacts(other)
    diffs = sorted(set(ref) ^ set(got))
    diffs += [k for k in sorted(set(ref) & set(got)) if not _same(ref[k], got[k])]
    return len(ref), diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", type=Path, default=REPO / "experiments" / "default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=None,
                    help="config overrides (default: a quick pipeline on the shipped sample)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--kills", type=int, default=2, help="kills per stage")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds the killed run's processes may take to end")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not Path("/proc").is_dir():
        print("kill_resume: needs Linux /proc to find the run's processes", file=sys.stderr)
        return 2
    overrides = QUICK if args.overrides is None else args.overrides
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ref = work / "reference"
    t0 = time.perf_counter()
    subprocess.run(_command(args.experiment, overrides, ref), check=True, env=env, stdout=subprocess.DEVNULL)
    durations = {s: json.loads((ref / "stages" / f"{s}.json").read_text()).get("seconds", 1.0) for s in STAGES
                 if (ref / "stages" / f"{s}.json").is_file()}
    print(f"reference run: {time.perf_counter() - t0:.1f} s; stage seconds "
          + ", ".join(f"{s} {d:.1f}" for s, d in durations.items()))
    rows, bad = [], 0
    for stage in args.stages:
        if stage not in durations:
            continue
        for k in range(args.kills):
            rng = np.random.default_rng([args.seed, STAGES.index(stage), k])
            delay = float(rng.uniform(0.0, max(durations[stage], 0.2)))
            run_dir = work / f"kill-{stage}-{k}"
            cmd = _command(args.experiment, overrides, run_dir)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            while proc.poll() is None and not _log_has(run_dir, f"stage {stage}: start"):
                time.sleep(0.02)
            time.sleep(delay)
            landed = _landed(run_dir) if proc.poll() is None else "end"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            deadline = time.time() + args.grace
            while time.time() < deadline and _session_pids(proc.pid):
                time.sleep(0.1)
            left = _session_pids(proc.pid)
            for pid in left:  # do not leave them to the next row
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            n, diffs = compare(ref, run_dir)
            bad += bool(diffs) + bool(left)
            rows.append((stage, delay, landed, len(left), n, diffs))
    print(f"{'stage':<11} {'kill at s':>9} {'landed in':<12} {'procs left':>10} {'artifacts':>9}  differences")
    for stage, delay, landed, left, n, diffs in rows:
        shown = ", ".join(diffs[:4]) + (f" (+{len(diffs) - 4})" if len(diffs) > 4 else "") if diffs else "none"
        print(f"{stage:<11} {delay:>9.2f} {landed:<12} {left:>10} {n:>9}  {shown}")
    print(f"kill_resume: {len(rows)} kills, {bad} failed (a rerun that differs or a process left behind); "
          f"{time.perf_counter() - t0:.0f} s; work folder {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
