"""Writers that share a process or a run folder (issue #20): atomic writes from many threads keep the
process umask and the files' modes; two processes racing for a run folder's stale lock: exactly one wins."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crf.atomic import atomic_write_bytes, current_umask, file_mode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a right mode is not a coincidence of the defaults."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_eight_threads_of_atomic_writes_keep_the_umask_and_the_modes(tmp_path, umask_027):
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    modes: list[int] = []

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(150):  # a new folder every few files: mkdir also honours the umask
                atomic_write_bytes(tmp_path / f"t{t}" / f"d{i // 5}" / f"f{i}.bin", b"x" * 64)
                modes.extend(file_mode() for _ in range(10))  # what a writer asks of the umask
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a busy many-core machine
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert current_umask() == umask_027
    mask = os.umask(umask_027)  # the one reading that changes it, after every writer has finished
    assert mask == umask_027
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    folders = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert len(files) == 8 * 150 and not [p for p in files if p.name.endswith(".tmp")]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o750)}
    assert set(modes) == {0o640} and file_mode() == 0o640


#: One contender: in every round it waits for the go file, then takes the run folder's lock; the winner
#: holds it until the other has its answer. Each answer goes to a file.
_CONTENDER = r"""
import sys, time
from pathlib import Path
from deeplab_v1.runner import StageError, run_lock
folder, me, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(folder / f"ready.{me}").touch()
for r in range(rounds):
    go = folder / f"go{r}"
    while not go.exists():
        pass
    answer = folder / f"r{r}.{me}"
    try:
        with run_lock(folder / ".lock"):
            answer.write_text("won")
            t = time.time()
            while not (folder / f"r{r}.{1 - me}").exists() and time.time() - t < 10:
                time.sleep(0.001)
    except StageError as exc:
        answer.write_text(f"refused: {exc}")
    (folder / f"done{r}.{me}").touch()
"""


def _wait_for(*paths: Path, seconds: float = 120) -> None:
    t = time.time()
    while not all(p.exists() for p in paths):
        assert time.time() - t < seconds, f"{paths} did not appear"
        time.sleep(0.001)


@pytest.mark.slow
def test_two_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    """A lock file left by a writer that died on another node: two processes take it over at the same
    moment, again and again; in every round exactly one holds the folder, and the other's error names the
    winner's pid and host."""
    rounds = 100
    lock = tmp_path / ".lock"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(tmp_path), str(me), str(rounds)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for me in (0, 1)]
    outcomes = []
    try:
        _wait_for(tmp_path / "ready.0", tmp_path / "ready.1")
        for r in range(rounds):
            lock.write_text(json.dumps({"host": "node-that-died", "pid": 999_999_999}))
            (tmp_path / f"go{r}").touch()
            _wait_for(tmp_path / f"done{r}.0", tmp_path / f"done{r}.1")
            outcomes.append([(tmp_path / f"r{r}.{me}").read_text() for me in (0, 1)])
            assert not lock.exists()
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert [sum(a == "won" for a in answers) for answers in outcomes] == [1] * rounds
    for answers in outcomes:
        winner = procs[answers.index("won")].pid
        (refusal,) = [a for a in answers if a != "won"]
        assert f"in use by process {winner} on {socket.gethostname()}" in refusal, refusal
