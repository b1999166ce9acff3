"""The search itself: the coarse grid, then the refinement rounds, each evaluated (``crf.search.evaluate``),
recorded (``crf.search.store``) and reported (``crf.search.report``). See ``crf.search`` for the paper's
text and the files."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..params import CRFParams
from .config import SearchConfig, param_key
from .dist import Distributed
from .evaluate import Evaluator
from .plan import decide_plan
from .report import best_of, rank_key, ranked_rows, write_outputs
from .store import RESULTS_FILE, cut_torn_tail, read_results, search_key, subset_hash
from ..errors import CRFInputError

__all__ = ["SearchResult", "halving_cut", "run_search"]


@dataclass
class SearchResult:
    """What :func:`run_search` found.

    ``best``: the best configuration; ``best_objective``: its objective; ``rows``: every configuration of
    this search (coarse and refinement rounds), best first, as dicts with rank, w1, sigma_alpha,
    sigma_beta, w2, sigma_gamma, iterations, objective, miou, pixel_accuracy (fractions, None where not
    measured), round and seconds (CRF seconds summed over the images); ``images``: the subset size;
    ``computed``: record lines written by this call (a configuration extended to more images counts once
    per rung; the others came from ``results.jsonl``); ``seconds``: wall time; ``out_dir``: the search
    folder; ``crf_runs``: (configuration, image) CRF runs made by this call; ``crf_runs_total``: those of
    the whole search (from the records); ``strategy``; ``backend``: the backend that ran (``auto``
    resolved) and ``backend_reason``.
    """

    best: CRFParams
    best_objective: float | None
    rows: list[dict]
    images: int
    computed: int
    seconds: float
    out_dir: Path
    crf_runs: int = 0
    crf_runs_total: int = 0
    strategy: str = "grid"
    backend: str = ""
    backend_reason: str = ""


def _at(rec: dict, images: int) -> dict:
    """``rec`` as it was ranked on its first ``images`` images: the objective from its ``history`` (the
    rung of ``images``, or the nearest one measured above it), for the halving's cut."""
    history = [h for h in rec.get("history", []) if h[0] >= images]
    if not history or int(rec.get("images", 0)) == images:
        return rec
    return {**rec, "images": images, "objective": min(history, key=lambda h: h[0])[1]}


def halving_cut(alive: Sequence[CRFParams], scored: Callable[[CRFParams], dict], eta: int) -> list[CRFParams]:
    """Successive halving's cut after a rung: the best ``ceil(groups / eta)`` lattice groups go on.

    A lattice group is the configurations sharing (sigma_alpha, sigma_beta, sigma_gamma) -- in the paper's
    grid the w1 values of one sigma pair -- ranked by its best member (``rank_key`` of ``scored(p)``, the
    record as of this rung). Whole groups go on because their members share one bilateral lattice (the
    torch backend filters them as extra channels of one pass) and because the w1 values of the best
    sigma pair differ least: on VOC images the cut of single configurations dropped the grid's best w1
    on few images (``tools/halving_study.py``); the choice among them is left to the images of the later
    rungs. Deterministic: the same records give the same survivors on every rank and worker count.

    Returns:
        The survivors, in the order of ``alive``.
    """
    groups: dict[tuple, list[CRFParams]] = {}
    for p in alive:
        groups.setdefault((p.sigma_alpha, p.sigma_beta, p.sigma_gamma), []).append(p)
    best = {g: min(rank_key(scored(p)) for p in members) for g, members in groups.items()}
    keep = set(sorted(groups, key=lambda g: best[g])[: max(1, math.ceil(len(groups) / eta))])
    return [p for p in alive if (p.sigma_alpha, p.sigma_beta, p.sigma_gamma) in keep]


def run_search(input_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, config: SearchConfig, *,
               progress: bool = True, dist: Optional[Distributed] = None,
               log: Optional[Callable[[str], None]] = None) -> SearchResult:
    """Coarse-to-fine search of w1, sigma_alpha, sigma_beta on the search input files (paper Sec. 5).

    With several ranks every rank must call this with the same files, config and ``dist``; rank 0 decides the
    plan (``crf.search.plan``), the (configuration, image) pairs are split among the ranks and the confusion
    matrices summed (gloo).

    Args:
        input_files: one search input file (``.npz``) per image (keys ``image``, ``probs``, ``label``,
            optionally ``band``; see ``crf.input_files``); their stems are the image ids.
        out_dir: the search folder (``results.jsonl``, ``ranked.md``, ``heatmap.png``, ``best.json``).
        config: the search space and how to run it.
        progress: tqdm bars (rank 0) and, without ``log``, the summary line at the end.
        dist: the ranks, given by the entry point (:class:`crf.search.dist.Distributed`; None: one process).
        log: where rank 0 writes the summary line (best parameters, objective, CRF runs) whatever
            ``progress`` is; None: printed with ``progress`` only.

    Returns:
        A :class:`SearchResult` (best configuration, its objective, all rows best first).

    Raises:
        CRFInputError (a ValueError): no input files, duplicated ids, a missing file (named), or ranks with different subsets.
        CRFTaskError (a RuntimeError): a CRF task failed, e.g. on a file with a missing key or a bad array (file and key
            named).
    """
    if not isinstance(config, SearchConfig):
        raise CRFInputError(f"config must be a crf.search.SearchConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    files = [str(Path(f)) for f in input_files]
    if not files:
        raise CRFInputError("run_search needs at least one search input file")
    subset = subset_hash(files)
    if not callable(config.objective):
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise CRFInputError(f"{len(missing)} sample file(s) do not exist (search input files), e.g. {missing[:3]}")
    out_dir = Path(out_dir)
    dist = dist or Distributed()
    plan = decide_plan(files, config, dist)  # rank 0's, on every rank; every rank's inputs checked against it
    key = search_key(config, subset, plan.backend, plan.inputs)
    results = out_dir / RESULTS_FILE
    evaluator = None
    try:
        if dist.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            records, _, torn = read_results(results, key)
            if torn:
                cut_torn_tail(results)
        else:
            records = None
        records = dist.broadcast(records)
        evaluator = Evaluator(files, config, key, results, records, dist, progress, plan)
        round_of: dict[tuple, int] = {}
        best = None
        schedule = config.halving_schedule(len(files))
        for r in range(config.rounds + 1):
            configs = config.coarse_grid() if r == 0 else config.refine(best, r)
            configs = [p for p in configs if param_key(p) not in round_of]
            for p in configs:
                round_of[param_key(p)] = r
            alive = configs
            for rung, images in enumerate(schedule):
                desc = f"crf search round {r}" + (f" rung {rung} ({len(alive)} x {images} images)"
                                                  if len(schedule) > 1 else "")
                evaluator.run(alive, r, len(alive), images, desc)
                if images == len(files):
                    break
                alive = halving_cut(alive, lambda p: _at(records[param_key(p)], images), config.eta)
            best = best_of(records, [k for k in round_of if int(records[k].get("images", 0)) >= len(files)])
    finally:
        if evaluator is not None:
            evaluator.close()
    rows = ranked_rows(records, round_of)
    best_rec = records[param_key(best)]
    seconds = time.perf_counter() - t0
    total_runs = sum(int(records[k].get("crf_runs", records[k].get("images", 0))) for k in round_of)
    result = SearchResult(best=best, best_objective=best_rec.get("objective"), rows=rows, images=len(files),
                          computed=evaluator.computed, seconds=seconds, out_dir=out_dir,
                          crf_runs=evaluator.crf_runs, crf_runs_total=total_runs, strategy=config.strategy,
                          backend=plan.backend, backend_reason=plan.backend_reason)
    if dist.rank == 0:
        write_outputs(out_dir, config, key, records, rows, best, len(files),
                      run_info={"strategy": config.strategy, "crf_runs": total_runs,
                                "crf_runs_grid": len(round_of) * len(files), "backend_requested": config.backend,
                                "backend_reason": plan.backend_reason, "device": plan.device,
                                "inputs_digest": plan.inputs,
                                "layout": evaluator.layout, "layout_reason": evaluator.layout_reason,
                                **config.halving_plan(len(files))})
        if progress or log is not None:
            from tqdm import tqdm

            obj = best_rec.get("objective")
            halving = config.halving_plan(len(files))
            obj_s = "n/a" if obj is None else (f"{obj:.6g}" if callable(config.objective) else f"{100 * obj:.2f}%")
            (log or tqdm.write)(
                f"crf search ({config.strategy}, {plan.backend} on {plan.device}, {evaluator.layout}): {len(rows)} "
                f"configurations, {total_runs} CRF runs of {len(round_of) * len(files)} for the grid "
                f"({evaluator.crf_runs} made now) x {len(files)} images in "
                f"{seconds:.1f} s; best w1={best.w1:g} sigma_alpha={best.sigma_alpha:g} "
                f"sigma_beta={best.sigma_beta:g}: {key['objective_name']} {obj_s}"
                + (f"; halving rungs {schedule}: {halving['halving_note']}" if halving else ""))
    return result
