"""Coarse-to-fine cross-validation of the CRF's bilateral term (DeepLab v1 Sec. 5).

Paper: "We use the default values of w2 = 3 and sigma_gamma = 3 and we search for the best values of w1,
sigma_alpha, and sigma_beta by cross-validation on a small subset of the validation set (we use 100
images). We employ coarse-to-fine search scheme. Specifically, the initial search range of the
parameters are w1 in [5, 10], sigma_alpha in [50:10:100] and sigma_beta in [3:1:10] (MATLAB notation),
and then we refine the search step sizes around the first round's best values. We fix the number of
mean field iterations to 10."

In MATLAB notation ``[5, 10]`` is the two-element vector {5, 10} (the release's own cross-validation
script also takes W in {5, 10}), while ``[50:10:100]`` is 50, 60, ..., 100 and ``[3:1:10]`` is 3, 4,
..., 10. The default coarse grid is therefore w1 in {5, 10}, sigma_alpha in {50, 60, ..., 100},
sigma_beta in {3, 4, ..., 10}: 2 x 6 x 8 = 96 configurations (w1 5, 6, ..., 10 instead is one YAML line
away: ``crf_search.w1: [5, 6, 7, 8, 9, 10]``). Each refinement round ``r`` (1..``rounds``) evaluates,
around the best configuration of the rounds before it, the points at -1, 0, +1 step of size
``coarse step * shrink**r`` on each axis (3 x 3 x 3 at most), without the configurations already
evaluated. The refinement is NOT held inside the coarse grid's bounds: it may step beyond them (towards
e.g. the release's LargeFOV w1 4, sigma_alpha 49 or 121); only values outside the valid domain (a
negative w1, a sigma <= 0) are dropped from their axis (see :meth:`SearchConfig.refine`).

Inputs are search input files (``.npz``, one per image, written ONCE by the caller; see
``crf.input_files``): ``image`` (H, W, 3) uint8 RGB, ``probs`` (C, H, W) float16/float32 (upsampled, cropped,
softmaxed), ``label`` (H, W) uint8 and, for the trimap objective, optionally ``band`` (H, W) bool (computed
from ``label`` and ``trimap_width`` with ``crf.trimap.trimap_band`` when absent). Worker processes load each
file once and keep it in a per-process cache.

Work split: the (configuration, image) pairs are divided among torch.distributed ranks (gloo; handed in by
the entry point as a ``Distributed``: the ``crf_search`` stage, or ``python -m crf.search`` under torchrun)
and, within a rank, among worker processes. Rank 0 decides the plan -- backend, layout, memory budget --
and every rank computes its share of its batches and tasks (``plan``), so ranks that see other cores,
load or memory still count every pair once. Every pair yields an integer confusion matrix
(``crf.confusion``, the same functions the evaluation reports with); the matrices are summed per
configuration (all_reduce SUM of int64 tensors across ranks), so 1 process, N workers and N ranks give
IDENTICAL matrices and tables.

Strategies (``SearchConfig.strategy``): ``grid`` (the paper's: every configuration of a round on every
image) or ``halving``: successive halving over the images (each round's configurations on
``min_images`` images but at least ``halving_floor`` (10: the grid on 10 images or fewer), the best
``1/eta`` on ``eta`` times as many, ..., the finalists on all of them,
with the same summed-confusion objective, whole lattice groups kept by each cut; about 28 % of the
grid's CRF runs for the paper's protocol).
Backend ``auto`` (the default) runs the torch backend where the largest image fits ``memory_mb`` (or, when
unset, a fixed 4096 MiB: never the machine's memory; ``crf.parallel.run_backend``), as one single-threaded
worker process per core (``crf.pool.default_workers``); on CUDA the
search runs in the calling process, images x configurations batched.

Resumability: ``results.jsonl`` in the output folder gets one JSON line per finished configuration,
flushed and fsync'ed at once (under halving, one line per configuration and rung: ``images`` it was
scored on, ``crf_runs``, ``history``). Every line carries the search key: the hash of the image subset
(sorted image ids), the objective name, the backend that ran and the fixed parameters (w2, sigma_gamma,
iterations) and the digest of the search input files' contents (``inputs``), so files rewritten
under the same ids are never mixed with old lines.
On restart, configurations already in the file under the same key are not redone; a torn line (a
partial write from a kill) is ignored with a warning and cut off; lines under another key (another
image subset, objective or backend) are SKIPPED with a warning, kept in the file for the record, and
never mixed into the ranking. Rank 0 alone reads and writes the file and broadcasts what it read.

Outputs (all written atomically, by rank 0): ``ranked.md`` (all configurations of this search, best
first), ``heatmap.png`` (one panel per w1 of the coarse grid: objective over sigma_alpha x sigma_beta),
``best.json`` (``CRFParams.to_dict()`` of the best configuration plus its scores, the backend that ran and
its device, the inputs' digest, the strategy and ``crf_runs``).

Modules: ``config`` (the grid and the refinement), ``store`` (``results.jsonl``), ``evaluate`` (the CRF on
the files, in workers), ``dist`` (the ranks), ``report`` (ranking and the output files), ``run``
(``run_search``), ``plan`` (backend, layout, budget, batches and tasks: one plan for every rank), ``cli``
(``python -m crf.search``, also under torchrun).
"""

from .cli import main
from .config import SearchConfig
from .dist import Distributed
from .run import SearchResult, run_search
from .store import read_results, subset_hash

__all__ = ["SearchConfig", "SearchResult", "Distributed", "run_search", "subset_hash", "read_results", "main"]
