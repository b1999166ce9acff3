"""The command line of the search: ``python -m crf.search --samples LIST --out DIR`` (also under
``torchrun ... -m crf.search``, one process per rank).

It is an entry point: under torchrun it alone reads torchrun's environment, starts the gloo process group,
hands the ranks to ``run_search`` and destroys the group at the end (:func:`torchrun_ranks`); the library
below it never does (issue #20 item 9)."""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .config import SearchConfig
from .dist import Distributed
from .run import run_search

__all__ = ["DESCRIPTION", "read_list", "torchrun_ranks", "gloo_ranks", "main"]

DESCRIPTION = "Coarse-to-fine cross-validation of the CRF's bilateral term (DeepLab v1 Sec. 5)."


def read_list(path: Path) -> list[Path]:
    """The files of a list file: one path a line (relative to the list's folder), ``#`` comments."""
    if not path.is_file():
        raise SystemExit(f"--samples: list file {path} does not exist")
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else path.parent / p)
    return out


@contextmanager
def torchrun_ranks() -> Iterator[Distributed]:
    """The ranks torchrun started this process among (``WORLD_SIZE``, ``RANK``, ``LOCAL_WORLD_SIZE``): a gloo
    process group started here -- or the one already started, if gloo -- and destroyed on leaving when
    started here. Without torchrun (``WORLD_SIZE`` unset or 1): the single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Distributed()
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        with gloo_ranks(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))) as ranks:
            yield ranks
    finally:
        if started:
            dist.destroy_process_group()


@contextmanager
def gloo_ranks(rank: int, world: int, local_world: int) -> Iterator[Distributed]:
    """The search's ranks in a started job: the default group when it is gloo, else one gloo group made
    here (the confusion matrices are CPU tensors, which NCCL cannot reduce) and destroyed on leaving. The
    one place for the entry points (this command line, the pipeline's crf_search stage; issue #20 item 8)."""
    import torch.distributed as dist

    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        yield Distributed(rank, world, group, local_world)
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crf.search --samples LIST.txt --out DIR [--config search.yaml] [--workers N]``.

    LIST.txt holds one search input file per line (relative paths are taken from the list's folder). The
    YAML file is a mapping of :class:`SearchConfig` fields. Run it under ``torchrun`` (or
    ``python -m torch.distributed.run``) to split the work across ranks. Rank 0 prints the result (best
    parameters, objective, CRF runs), with ``--no-progress`` too.
    """
    ap = argparse.ArgumentParser(prog="python -m crf.search", description=DESCRIPTION)
    ap.add_argument("--samples", type=Path, required=True, help="text file: one search input file (.npz) per line")
    ap.add_argument("--out", type=Path, required=True, help="search folder (results.jsonl, ranked.md, ...)")
    ap.add_argument("--config", type=Path, help="YAML mapping of SearchConfig fields (default: the paper's grid)")
    ap.add_argument("--workers", type=int, help="worker processes per rank (overrides the YAML)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    values: dict = {}
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            raise SystemExit(f"--config: {args.config} does not exist")
        values = yaml.safe_load(args.config.read_text()) or {}
    if args.workers is not None:
        values["workers"] = args.workers
    try:
        config = SearchConfig.from_dict(values)
    except ValueError as exc:
        raise SystemExit(f"{args.config}: {exc}")
    with torchrun_ranks() as ranks:
        run_search(read_list(args.samples), args.out, config, progress=not args.no_progress, dist=ranks, log=print)
    return 0
