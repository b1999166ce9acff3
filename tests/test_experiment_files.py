"""Experiment files on top of base files (``base:``): the shipped experiments resolve exactly as before the
bases were introduced, and the merge rules of ``deeplab_v1.experiment_files`` on tiny files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from deeplab_v1.config import ConfigError, load_config, to_dict
from deeplab_v1.errors import DeepLabError
from deeplab_v1.experiment_files import ExperimentFileError, read_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
#: ``to_dict(load_config(path, check_paths=False))`` of every experiments/*.yaml, taken before the bases
#: were introduced; absolute paths under the repository written as ``<repo>/...``
SNAPSHOT = json.loads((REPO / "tests" / "data" / "experiments_resolved.json").read_text(encoding="utf-8"))


def _experiment_files() -> list[Path]:
    return sorted(p for p in EXPERIMENTS.glob("*.yaml") if not p.name.startswith("."))


def _repo_relative(value):
    """Absolute paths under the repository as ``<repo>/...``, as in the snapshot."""
    if isinstance(value, str):
        return value.replace(str(REPO), "<repo>")
    if isinstance(value, list):
        return [_repo_relative(v) for v in value]
    if isinstance(value, dict):
        return {k: _repo_relative(v) for k, v in value.items()}
    return value


def _resolved(path: Path) -> dict:
    """``to_dict`` of the experiment as ``load_config`` resolves it, bases included, from the repository
    root (the default ``output_dir`` is ``./runs/<name>`` under the current folder)."""
    here = os.getcwd()
    os.chdir(REPO)
    try:
        return _resolved_here(path)
    finally:
        os.chdir(here)


def _resolved_here(path: Path) -> dict:
    try:
        # once load_config reads files through read_experiment, this is all there is to it
        cfg = load_config(path, check_paths=False)
    except ConfigError as exc:
        if "unknown key 'base'" not in str(exc):
            raise
        # load_config does not follow `base:` yet: do what it will do. Write the merged mapping to a file in
        # the SAME folder as the experiment (relative paths and the default output_dir, runs/<name>, are
        # taken from that folder; `name` is in the merged mapping) and load that.
        merged, _ = read_experiment(path)
        tmp = path.parent / f".tmp_{os.getpid()}_{path.name}"
        try:
            tmp.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
            cfg = load_config(tmp, check_paths=False)
        finally:
            tmp.unlink(missing_ok=True)
    return _repo_relative(to_dict(cfg))


def test_snapshot_covers_every_experiment():
    assert {p.name for p in _experiment_files()} == set(SNAPSHOT)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) and k != "lr_mult" else {key: v})
    return out


@pytest.mark.parametrize("path", _experiment_files(), ids=lambda p: p.name)
def test_experiment_resolves_as_before_the_bases(path):
    """Every key of the snapshot resolves to the same value (keys added to the schema since then take their
    defaults and are not part of the comparison)."""
    resolved, before = _flat(_resolved(path)), _flat(SNAPSHOT[path.name])
    assert {k: resolved.get(k, "<missing>") for k in before} == before


def test_msc_lr_mult_keeps_the_release_order():
    """``train.lr_mult`` is ordered (first match wins): a variant that sets ``fc8`` keeps its place."""
    for name in ("voc12-deeplab-msc.yaml", "voc12-deeplab-msc-largefov.yaml"):
        merged, files = read_experiment(EXPERIMENTS / name)
        assert list(merged["train"]["lr_mult"]) == ["conv*", "fc6", "fc7", "fc8", "*_conv", "*_fc", "*_ms"]
        assert files[-1] == (EXPERIMENTS / name).resolve() and len(files) == 3
    assert read_experiment(EXPERIMENTS / "voc12-deeplab-msc.yaml")[0]["train"]["lr_mult"]["fc8"] == [1, 2]
    assert read_experiment(EXPERIMENTS / "voc12-deeplab-msc-largefov.yaml")[0]["train"]["lr_mult"]["fc8"] == [0, 0]


# ------------------------------------------------------------------------------------ merge rules


def _write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def _error(path: Path) -> str:
    with pytest.raises(ExperimentFileError) as e:
        read_experiment(path)
    assert isinstance(e.value, DeepLabError) and isinstance(e.value, ValueError)
    return str(e.value)


def test_nested_mappings_merge_key_by_key(tmp_path):
    _write(tmp_path, "base.yaml", "seed: 1\ntrain: {iterations: 10, batch_size: 2, lr_mult: {a: [1, 1], b: [2, 2]}}\n"
                                  "crf: {params: {w1: 4, sigma_alpha: 49}}\n")
    v = _write(tmp_path, "v.yaml", "base: base.yaml\ntrain: {batch_size: 4, lr_mult: {a: [0, 0], c: [3, 3]}}\n"
                                   "crf: {params: {w1: 5}}\nname: v\n")
    merged, files = read_experiment(v)
    assert merged == {
        "seed": 1,
        "train": {"iterations": 10, "batch_size": 4, "lr_mult": {"a": [0, 0], "b": [2, 2], "c": [3, 3]}},
        "crf": {"params": {"w1": 5, "sigma_alpha": 49}},
        "name": "v",
    }
    assert list(merged["train"]["lr_mult"]) == ["a", "b", "c"]  # the base's order, new keys after
    assert files == [(tmp_path / "base.yaml").resolve(), v.resolve()]


def test_lists_and_scalars_replace(tmp_path):
    _write(tmp_path, "base.yaml", "test: {scales: [0.5, 1.0, 1.5], flip: true}\nmodel: {multi_grid: [1, 2, 4]}\n"
                                  "data: {root: here}\n")
    v = _write(tmp_path, "v.yaml", "base: base.yaml\ntest: {scales: [1.0]}\nmodel: {multi_grid: null}\n"
                                   "data: [not, a, mapping]\n")
    merged, _ = read_experiment(v)
    assert merged == {"test": {"scales": [1.0], "flip": True}, "model": {"multi_grid": None},
                      "data": ["not", "a", "mapping"]}


def test_list_of_bases_merges_left_to_right(tmp_path):
    _write(tmp_path, "a.yaml", "seed: 1\ntrain: {iterations: 1, batch_size: 1}\n")
    _write(tmp_path, "b.yaml", "seed: 2\ntrain: {iterations: 2}\nname: b\n")
    v = _write(tmp_path, "v.yaml", "base: [a.yaml, b.yaml]\ntrain: {batch_size: 3}\n")
    merged, files = read_experiment(v)
    assert merged == {"seed": 2, "train": {"iterations": 2, "batch_size": 3}, "name": "b"}
    assert files == [(tmp_path / n).resolve() for n in ("a.yaml", "b.yaml", "v.yaml")]
    assert read_experiment(_write(tmp_path, "none.yaml", "base: []\nseed: 5\n"))[0] == {"seed": 5}


def test_base_paths_are_relative_to_the_file_that_names_them(tmp_path):
    # exp/v.yaml -> exp/_base/mid.yaml -> exp/_base/deep/root.yaml: each `base:` relative to its own file;
    # the paths in the bases are left as written (load_config takes them from exp/, the named file's folder)
    _write(tmp_path, "exp/_base/deep/root.yaml", "data: {root: ../data/VOC2012}\nseed: 0\n")
    _write(tmp_path, "exp/_base/mid.yaml", "base: deep/root.yaml\nmodel: {init: ../data/init/w.pth}\n")
    v = _write(tmp_path, "exp/v.yaml", "base: _base/mid.yaml\nname: v\n")
    merged, files = read_experiment(v)
    assert merged == {"data": {"root": "../data/VOC2012"}, "seed": 0, "model": {"init": "../data/init/w.pth"}, "name": "v"}
    assert [f.name for f in files] == ["root.yaml", "mid.yaml", "v.yaml"]
    # an absolute base path works too
    w = _write(tmp_path, "elsewhere/w.yaml", f"base: {json.dumps(str(tmp_path / 'exp' / '_base' / 'mid.yaml'))}\n")
    assert read_experiment(w)[0]["model"] == {"init": "../data/init/w.pth"}


def test_same_base_twice_is_not_a_cycle(tmp_path):
    _write(tmp_path, "root.yaml", "seed: 1\n")
    _write(tmp_path, "a.yaml", "base: root.yaml\nname: a\n")
    _write(tmp_path, "b.yaml", "base: root.yaml\ntrain: {iterations: 3}\n")
    merged, _ = read_experiment(_write(tmp_path, "v.yaml", "base: [a.yaml, b.yaml]\n"))
    assert merged == {"seed": 1, "name": "a", "train": {"iterations": 3}}


def test_cycle_of_bases_names_the_files(tmp_path):
    a = _write(tmp_path, "a.yaml", "base: b.yaml\nseed: 1\n")
    _write(tmp_path, "b.yaml", "base: [c.yaml, a.yaml]\n")
    _write(tmp_path, "c.yaml", "seed: 2\n")
    msg = _error(a)
    assert "cycle" in msg and str(tmp_path / "a.yaml") in msg and str(tmp_path / "b.yaml") in msg
    own = _write(tmp_path, "self.yaml", "base: self.yaml\n")
    msg = _error(own)
    assert "cycle" in msg and str(own) in msg


def test_missing_base_names_the_file_and_the_base(tmp_path):
    v = _write(tmp_path, "v.yaml", "base: _base/nowhere.yaml\nseed: 1\n")
    msg = _error(v)
    assert str(v) in msg and "nowhere.yaml" in msg and "not found" in msg
    assert "not found" in _error(tmp_path / "absent.yaml")


@pytest.mark.parametrize("where", ["variant", "base", "nested in a base"])
def test_duplicate_key_names_the_file_and_the_key(tmp_path, where):
    dup_base = {"variant": "seed: 1\n", "base": "seed: 1\ntrain: {iterations: 1}\nseed: 2\n",
                "nested in a base": "train:\n  iterations: 1\n  batch_size: 2\n  iterations: 3\n"}[where]
    base = _write(tmp_path, "base.yaml", dup_base)
    dup_variant = "base: base.yaml\ntrain: {iterations: 1}\nname: v\ntrain: {batch_size: 2}\n"
    v = _write(tmp_path, "v.yaml", dup_variant if where == "variant" else "base: base.yaml\nname: v\n")
    msg = _error(v)
    bad, key = {"variant": (v, "'train'"), "base": (base, "'seed'"), "nested in a base": (base, "'iterations'")}[where]
    assert msg.startswith(f"{bad}:") and "duplicate key" in msg and key in msg


def test_yaml_merge_keys_may_still_override(tmp_path):
    v = _write(tmp_path, "v.yaml", "common: &c {a: 1, b: 2}\ntrain:\n  <<: *c\n  b: 3\n")
    assert read_experiment(v)[0]["train"] == {"a": 1, "b": 3}


@pytest.mark.parametrize("value", ["3", "[a.yaml, 3]", "null", "{a: b}", "''"])
def test_base_must_be_a_path_or_a_list_of_paths(tmp_path, value):
    _write(tmp_path, "a.yaml", "seed: 1\n")
    v = _write(tmp_path, "v.yaml", f"base: {value}\nseed: 1\n")
    msg = _error(v)
    assert msg.startswith(f"{v}:") and "'base'" in msg


def test_base_that_is_not_a_mapping_names_the_base(tmp_path):
    base = _write(tmp_path, "base.yaml", "- a\n- b\n")
    msg = _error(_write(tmp_path, "v.yaml", "base: base.yaml\n"))
    assert msg.startswith(f"{base}:") and "mapping" in msg
    empty = _write(tmp_path, "empty.yaml", "")  # an empty file is an empty mapping, as in load_config
    assert read_experiment(_write(tmp_path, "w.yaml", "base: empty.yaml\nseed: 1\n"))[0] == {"seed": 1}
    assert read_experiment(empty) == ({}, [empty.resolve()])


def test_invalid_yaml_names_the_file(tmp_path):
    base = _write(tmp_path, "base.yaml", "train: {iterations: 1\n")
    msg = _error(_write(tmp_path, "v.yaml", "base: base.yaml\n"))
    assert msg.startswith(f"{base}:") and "not valid YAML" in msg
