"""The search itself: the coarse grid, then the refinement rounds, each evaluated (``crf.search.evaluate``),
recorded (``crf.search.store``) and reported (``crf.search.report``). See ``crf.search`` for the paper's
text and the files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..params import CRFParams
from .config import SearchConfig, param_key
from .dist import Distributed
from .evaluate import Evaluator
from .report import best_of, ranked_rows, write_outputs
from .store import RESULTS_FILE, cut_torn_tail, read_results, search_key, subset_hash

__all__ = ["SearchResult", "run_search"]


@dataclass
class SearchResult:
    """What :func:`run_search` found.

    ``best``: the best configuration; ``best_objective``: its objective; ``rows``: every configuration of
    this search (coarse and refinement rounds), best first, as dicts with rank, w1, sigma_alpha,
    sigma_beta, w2, sigma_gamma, iterations, objective, miou, pixel_accuracy (fractions, None where not
    measured), round and seconds (CRF seconds summed over the images); ``images``: the subset size;
    ``computed``: configurations evaluated by this call (the others came from ``results.jsonl``);
    ``seconds``: wall time; ``out_dir``: the search folder.
    """

    best: CRFParams
    best_objective: float | None
    rows: list[dict]
    images: int
    computed: int
    seconds: float
    out_dir: Path


def run_search(input_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, config: SearchConfig, *,
               progress: bool = True) -> SearchResult:
    """Coarse-to-fine search of w1, sigma_alpha, sigma_beta on the search input files (paper Sec. 5).

    Under torchrun (``WORLD_SIZE`` > 1) every rank must call this with the same files and config; the
    (configuration, image) pairs are split among the ranks and the confusion matrices summed (gloo).

    Args:
        input_files: one search input file (``.npz``) per image (keys ``image``, ``probs``, ``label``,
            optionally ``band``; see ``crf.input_files``); their stems are the image ids.
        out_dir: the search folder (``results.jsonl``, ``ranked.md``, ``heatmap.png``, ``best.json``).
        config: the search space and how to run it.
        progress: tqdm bars (rank 0) and a summary line at the end.

    Returns:
        A :class:`SearchResult` (best configuration, its objective, all rows best first).

    Raises:
        ValueError: no input files, duplicated ids, a missing file (named), or ranks with different subsets.
        CRFTaskError (a RuntimeError): a CRF task failed, e.g. on a file with a missing key or a bad array (file and key
            named).
    """
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a crf.search.SearchConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    files = [str(Path(f)) for f in input_files]
    if not files:
        raise ValueError("run_search needs at least one search input file")
    subset = subset_hash(files)
    if not callable(config.objective):
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} sample file(s) do not exist (search input files), e.g. {missing[:3]}")
    out_dir = Path(out_dir)
    key = search_key(config, subset)
    results = out_dir / RESULTS_FILE
    dist = Distributed.from_env()
    evaluator = None
    try:
        if dist.world > 1 and dist.broadcast(subset) != subset:
            raise ValueError(f"rank {dist.rank} has another image subset ({subset}) than rank 0")
        if dist.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            records, _, torn = read_results(results, key)
            if torn:
                cut_torn_tail(results)
        else:
            records = None
        records = dist.broadcast(records)
        evaluator = Evaluator(files, config, key, results, records, dist, progress)
        round_of: dict[tuple, int] = {}
        best = None
        for r in range(config.rounds + 1):
            configs = config.coarse_grid() if r == 0 else config.refine(best, r)
            configs = [p for p in configs if param_key(p) not in round_of]
            for p in configs:
                round_of[param_key(p)] = r
            todo = [p for p in configs if param_key(p) not in records]
            if todo:
                evaluator.run(todo, r, len(configs))
            best = best_of(records, list(round_of))
    finally:
        if evaluator is not None:
            evaluator.close()
        dist.close()
    rows = ranked_rows(records, round_of)
    best_rec = records[param_key(best)]
    seconds = time.perf_counter() - t0
    result = SearchResult(best=best, best_objective=best_rec.get("objective"), rows=rows, images=len(files),
                          computed=evaluator.computed, seconds=seconds, out_dir=out_dir)
    if dist.rank == 0:
        write_outputs(out_dir, config, key, records, rows, best, len(files))
        if progress:
            from tqdm import tqdm

            obj = best_rec.get("objective")
            obj_s = "n/a" if obj is None else (f"{obj:.6g}" if callable(config.objective) else f"{100 * obj:.2f}%")
            tqdm.write(f"crf search: {len(rows)} configurations ({evaluator.computed} computed, "
                       f"{len(rows) - evaluator.computed} from {RESULTS_FILE}) x {len(files)} images in "
                       f"{seconds:.1f} s; best w1={best.w1:g} sigma_alpha={best.sigma_alpha:g} "
                       f"sigma_beta={best.sigma_beta:g}: {key['objective_name']} {obj_s}")
    return result
