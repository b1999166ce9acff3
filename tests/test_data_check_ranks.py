"""The data check under torchrun (issue #20): every rank checks its share of the images and every rank
gets every verdict, so no rank waits in a collective (up to its timeout) while another checks a whole
list. Two gloo ranks with a collective timeout shorter than one rank's check of the whole list."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.yaml"
#: Seconds each image's check takes here (a slow disk): 14 images are 8.4 s for one rank, 4.2 s per share.
CHECK_S = 0.6
#: The collective timeout of the two ranks: shorter than one rank checking every image.
TIMEOUT_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DEEPLAB_DIST_TIMEOUT_S=str(TIMEOUT_S))
    import deeplab_v1.data.check as check
    from deeplab_v1.config import load_config
    from deeplab_v1.errors import DeepLabError
    from deeplab_v1.runner import Runner

    checked = []
    real = check._check_one

    def slow_check(sample, num_classes):
        checked.append(sample.id)
        time.sleep(CHECK_S)
        return real(sample, num_classes)

    check._check_one = slow_check
    check.available_cores = lambda: 1  # one thread per rank, whatever the machine
    runner = Runner(load_config(DEFAULT, [f"output_dir={out}", f"data.root={root}"]), progress=False)
    runner._run = lambda stages: {}  # the check before the stages is what is tested
    t0 = time.monotonic()
    try:
        runner.run()
        answer = "ok"
    except DeepLabError as exc:
        answer = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"answer": answer, "checked": checked,
                                                         "seconds": time.monotonic() - t0}))


@pytest.mark.slow
def test_every_rank_checks_its_share_and_gets_every_verdict(tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(REPO / "experiments" / "sample" / "VOC2012", root)
    train_ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    bad = root / "JPEGImages" / f"{train_ids[1]}.jpg"  # the second image to check: rank 1's share
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    mp.spawn(_rank, args=(_free_port(), str(root), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    answers, shares = [r["answer"] for r in ranks], [set(r["checked"]) for r in ranks]
    assert answers[0] == answers[1], answers  # rank 0 reports what rank 1 found, and the other way round
    assert answers[0].startswith("DataError: 1 of 14 samples cannot be used") and str(bad) in answers[0]
    assert len(shares[0]) == len(shares[1]) == 7 and not shares[0] & shares[1]
    assert train_ids[1] in shares[1]
