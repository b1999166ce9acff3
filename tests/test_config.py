"""Experiment YAML: validation before any work, overrides, the shipped experiments."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeplab_v1.config import ConfigError, apply_overrides, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_default_experiment_loads_with_sample_paths():
    cfg = load_config(REPO / "experiments" / "default.yaml")
    assert cfg.model.name == "deeplab-largefov"
    assert cfg.data.root == (REPO / "experiments" / "sample" / "VOC2012").resolve()
    assert cfg.data.root.is_dir()
    assert cfg.output_dir == (REPO / "runs" / "default").resolve()


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("voc12-*.yaml")), ids=lambda p: p.name)
def test_paper_experiments_have_valid_schema(path):
    cfg = load_config(path, check_paths=False)
    assert path.name == f"voc12-{cfg.model.name}.yaml"
    if "v3" in cfg.model.name:  # v3 Sec. 4.1 protocol
        assert cfg.train.lr_policy == "poly" and cfg.train.base_lr == 0.007 and cfg.train.crop_size == 513
        assert cfg.train.label_mode == "upsample" and cfg.test.flip and len(cfg.test.scales) == 6
    else:  # the release's solver.prototxt
        assert cfg.train.base_lr == 0.001 and cfg.train.step_size == 2000 and cfg.train.iterations == 6000
        assert cfg.train.crop_size == (306 if cfg.model.name in ("deeplab", "deeplab-7x7", "deeplab-4x4") else 321)
    assert cfg.crf_search.num_images == 100
    # placeholders: the data paths are not there until the user sets them, and the error says which key
    with pytest.raises(ConfigError, match="data.root|model.init"):
        load_config(path)


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "data: {root: data}\ntrain: {iterations: 10, bacth_size: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.bacth_size" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, "data: {root: data}\ntrain: {iterations: ten}\n")
    with pytest.raises(ConfigError, match="train.iterations.*int"):
        load_config(p)
    p = _write(tmp_path, "data: {root: data}\ncrf: {params: {w1: 4, sigma_alpha: -1, sigma_beta: 5}}\n")
    with pytest.raises(ConfigError, match="crf.params.*sigma_alpha"):
        load_config(p)
    p = _write(tmp_path, "data: {root: data}\nmodel: {name: deeplab-9x9}\n")
    with pytest.raises(ConfigError, match="model.name"):
        load_config(p)


def test_missing_path_names_key(tmp_path):
    p = _write(tmp_path, "data: {root: nowhere}\n")
    with pytest.raises(ConfigError, match="data.root.*nowhere"):
        load_config(p)
    p = _write(tmp_path, "data: {root: data}\nmodel: {init: missing.caffemodel}\n")
    with pytest.raises(ConfigError, match="model.init"):
        load_config(p)


def test_overrides_apply_before_validation(tmp_path):
    p = _write(tmp_path, "data: {root: data}\n")
    cfg = load_config(p, ["train.iterations=7", "crf.params.w1=6", "test.scales=[0.5, 1.0]"])
    assert cfg.train.iterations == 7 and cfg.crf.params.w1 == 6 and cfg.test.scales == [0.5, 1.0]
    with pytest.raises(ConfigError, match="train.itrations"):
        load_config(p, ["train.itrations=7"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.iterations"], "x")
    assert to_dict(cfg)["train"]["iterations"] == 7


def test_lr_mult_is_checked_against_the_models_layers(tmp_path):
    from deeplab_v1.config import ConfigError, load_config
    from deeplab_v1.stages.train import check_lr_mult  # the check the runner makes before any work

    exp = tmp_path / "e.yaml"
    exp.write_text("model: {name: deeplab-msc-largefov}\ntrain:\n  lr_mult: {'conv*': [0, 0], 'pool9_*': [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"train\.lr_mult\.pool9_\*.*matches no layer of deeplab-msc-largefov"):
        check_lr_mult(load_config(exp, check_paths=False))
    exp.write_text("model: {name: deeplab-largefov}\ntrain:\n  lr_mult: {'fc8': [1]}\n")
    with pytest.raises(ConfigError, match=r"train\.lr_mult\.fc8.*two numbers >= 0"):
        load_config(exp, check_paths=False)
    exp.write_text("model: {name: deeplab-largefov}\ntrain:\n  lr_mult: {'fc8': [1, -2]}\n")
    with pytest.raises(ConfigError, match=r"train\.lr_mult\.fc8"):
        load_config(exp, check_paths=False)
    exp.write_text("model: {name: deeplab-largefov}\ntrain:\n  lr_mult: {'conv*': [0, 0], 'fc8': [10, 20]}\n")
    assert load_config(exp, check_paths=False).train.lr_mult == {"conv*": [0, 0], "fc8": [10, 20]}


def test_an_lr_mult_pattern_matching_no_layer_stops_the_run_before_any_work(tmp_path, capsys):
    """The schema builds no model: the pattern check is the train stage's (``stages.train.check_lr_mult``),
    made by the runner before the run folder, the data check or any stage; the message names the file."""
    from deeplab_v1.cli import main

    exp = tmp_path / "e.yaml"
    exp.write_text(f"base: {REPO / 'experiments' / 'default.yaml'}\noutput_dir: run\n"
                   f"data: {{root: {REPO / 'experiments' / 'sample' / 'VOC2012'}}}\n"
                   "train:\n  lr_mult: {'conv*': [0, 0], 'fc9': [1, 2]}\n")
    assert load_config(exp).train.lr_mult == {"conv*": [0, 0], "fc9": [1, 2]}  # the schema accepts it
    assert main(["run", str(exp), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deeplab: error: {exp}: key 'train.lr_mult.fc9' matches no layer of deeplab-largefov")
    assert "conv1_1" in err and "\n" not in err and not (tmp_path / "run").exists()
    assert main(["run", str(exp), "--no-progress", "--set", "train.lr_mult.fc9=[1, 2]"]) == 2
    assert capsys.readouterr().err.startswith("deeplab: error: --set train.lr_mult.fc9=[1, 2]: key 'train.lr_mult.fc9'")
