"""Messages name what is at fault and where it came from (issue #21): a ``--set`` typo is the ``--set``'s,
not the YAML file's; an output folder that cannot be made names the key and the path; a folder given as an
image says so; a file that is not a checkpoint says so on one line, without torch's advice to load it with
``weights_only=False``. Each through the ``deeplab`` command, as a user sees it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeplab_v1.cli import main, resolve_experiment
from deeplab_v1.config import ConfigError, load_config

SAMPLE_IMAGES = resolve_experiment("crf-demo").parent / "sample" / "VOC2012" / "JPEGImages"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("deeplab: error: ")
    return err[0][len("deeplab: error: "):]


def test_a_typo_in_set_is_the_sets_not_the_files(capsys):
    assert main(["run", "crf-demo", "--no-progress", "--set", "crf_search.num_imgs=5"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("--set crf_search.num_imgs=5: unknown key 'crf_search.num_imgs'")
    assert "did you mean 'num_images'" in line and ".yaml" not in line
    # a wrong value given by --set names the --set; a wrong value in the file names the file, even beside a --set
    with pytest.raises(ConfigError, match=r"^--set train\.iterations=x: key 'train\.iterations' must be int"):
        load_config(resolve_experiment("crf-demo"), ["train.iterations=x"])


def test_a_mistake_in_the_file_is_the_files(tmp_path):
    exp = tmp_path / "mine.yaml"
    exp.write_text(f"base: {resolve_experiment('crf-demo')}\ntrain: {{iterations: x}}\n")
    with pytest.raises(ConfigError, match=rf"^{exp}: key 'train\.iterations' must be int"):
        load_config(exp, ["train.batch_size=2"])


def test_an_output_dir_that_cannot_be_made_names_the_key_and_path(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, why in ((a_file / "run", f"under {a_file}, which is a file, not a folder"),
                        (a_file, "which is a file, not a folder"),
                        (Path("/proc/deeplab-x"), "which cannot be created in /proc")):
        assert main(["run", "crf-demo", "--no-progress", "--set", f"output_dir={target}"]) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"--set output_dir={target}: key 'output_dir' points to {target}, {why}"), line
        assert "Errno" not in line
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_predict_on_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert main(["predict", str(SAMPLE_IMAGES), "--weights", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"{SAMPLE_IMAGES}: a folder, not an image; pass the image files, e.g. {SAMPLE_IMAGES / '*.jpg'}")
    assert "not found" not in line


class _Anything:
    """An object torch.load(weights_only=True) refuses to unpickle."""


@pytest.mark.parametrize("kind", ["yaml", "object", "folder"])
def test_weights_that_are_not_a_checkpoint_say_so_on_one_line(kind, tmp_path, capsys):
    image = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    if kind == "yaml":
        weights = tmp_path / "config.yaml"
        weights.write_text(resolve_experiment("crf-demo").read_text())
        expected = f"--weights {weights}: not a checkpoint: not a file torch.save wrote"
    elif kind == "object":
        weights = tmp_path / "obj.pth"
        torch.save({"state_dict": _Anything()}, weights)
        expected = f"--weights {weights}: not a checkpoint of tensors: it holds other Python objects"
    else:
        weights = tmp_path
        expected = f"--weights {weights}: a folder, not a checkpoint; pass the .pth file"
    assert main(["predict", str(image), "--weights", str(weights), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(expected), line
    assert "weights_only" not in line and "arbitrary code" not in line and len(line) < 300
