"""The search's results file, ``results.jsonl``: one JSON line per finished configuration, under the key of
its search (image subset, the digest of the inputs' contents, objective, backend, fixed parameters), so that
a killed search resumes and lines of another search -- or of the same image ids with other contents -- are
never mixed in (see ``crf.search``). Rank 0 alone reads and writes it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

from ..params import CRFParams
from .config import SearchConfig, param_key
from ..errors import CRFInputError

__all__ = ["RESULTS_FILE", "subset_hash", "search_key", "read_results", "cut_torn_tail", "append_records",
           "finite_or_none"]

RESULTS_FILE = "results.jsonl"
#: Key fields every line has had; the others (``inputs``) count as None where an older line lacks them.
_REQUIRED = ("subset_hash", "objective_name", "backend", "fixed")


def subset_hash(input_files: Sequence[str | os.PathLike]) -> str:
    """Key of an image subset: SHA-256 (first 16 hex digits) of the sorted image ids (the stems of the
    search input files).

    Raises:
        CRFInputError (a ValueError): two files share a stem (the ids would be ambiguous).
    """
    ids = [Path(f).stem for f in input_files]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CRFInputError(f"search input files must have distinct names (ids); duplicated: {dup[:10]}")
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def search_key(config: SearchConfig, subset: str, backend: str | None = None, inputs: str | None = None) -> dict:
    """The key every line of one search carries: the image subset, ``inputs`` (the digest of the search
    input files' contents, ``crf.search.plan.inputs_digest``; None for a callable objective, whose files are
    names only), the objective, the backend that runs (``backend``, the resolved choice of ``backend:
    auto``; default ``config.backend``) and the fixed parameters (w2, sigma_gamma, iterations). Lines under
    another key belong to another search: a file rewritten with other scores or labels under the same id
    changes ``inputs`` (issue #20 item 6). The strategy is not part of it: a line holds a configuration's
    confusion over its first ``images`` images (in the order of ``image_order``), which both strategies use
    and extend."""
    return {"subset_hash": subset, "inputs": inputs, "objective_name": config.objective_name,
            "backend": backend or config.backend,
            "fixed": {"w2": config.w2, "sigma_gamma": config.sigma_gamma, "iterations": config.iterations}}


def read_results(path: str | os.PathLike, key: dict) -> tuple[dict[tuple, dict], int, bool]:
    """Read ``results.jsonl``: the records under ``key`` by configuration.

    Returns:
        ``(records, foreign, torn)``: records keyed by configuration (the line scored on the most images
        wins, later lines among equals), the number of
        valid lines under another key (skipped, with one warning), and whether the file ends with a
        partial line (warned; the caller cuts it off before appending).
    """
    path = Path(path)
    records: dict[tuple, dict] = {}
    if not path.is_file():
        return records, 0, False
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    foreign: dict[tuple, int] = {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            params = CRFParams.from_dict(rec["params"])
            rec_key = {k: rec[k] if k in _REQUIRED else rec.get(k) for k in key}
        except Exception as exc:  # torn or otherwise broken line
            last = number == len(lines)
            what = "torn last line (a partial write, e.g. from a kill)" if last else "unreadable line"
            warnings.warn(f"results file {path} line {number}: {what} ignored; its configuration is redone "
                          f"({type(exc).__name__}: {exc})", stacklevel=2)
            continue
        if rec_key != key:
            k = (rec_key["subset_hash"], rec_key["objective_name"], rec_key["backend"],
                 json.dumps(rec_key["fixed"], sort_keys=True), rec_key.get("inputs"))
            foreign[k] = foreign.get(k, 0) + 1
            continue
        rec["params"] = params.to_dict()
        k = param_key(params)
        if k not in records or int(rec.get("images", 0)) >= int(records[k].get("images", 0)):
            records[k] = rec
    n_foreign = sum(foreign.values())
    if n_foreign:
        other = "; ".join(f"subset {k[0]}, objective {k[1]}, backend {k[2]}, fixed {k[3]}, inputs {k[4]}: "
                          f"{n} line(s)" for k, n in foreign.items())
        warnings.warn(f"results file {path}: {n_foreign} line(s) of another search ignored, never mixed in "
                      f"(this search: subset {key['subset_hash']}, objective {key['objective_name']}, backend "
                      f"{key['backend']}, fixed {json.dumps(key['fixed'], sort_keys=True)}, inputs "
                      f"{key.get('inputs')}; other: {other})", stacklevel=2)
    return records, n_foreign, torn


def cut_torn_tail(path: Path) -> None:
    """Cut a partial last line (a write killed half-way) off ``path``, so that appending starts afresh."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def append_records(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record to ``path`` (sorted keys), flushed and fsync'ed at once."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or None where it is None or not finite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)
