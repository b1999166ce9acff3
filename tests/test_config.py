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
    end_to_end = cfg.model.crf_rnn.enabled  # CRF-as-RNN (#24): a trained net fine-tuned with its CRF layer
    assert path.name == f"voc12-{cfg.model.name}{'-crfrnn' if end_to_end else ''}.yaml"
    if "v3" in cfg.model.name:  # v3 Sec. 4.1 protocol
        assert cfg.train.lr_policy == "poly" and cfg.train.base_lr == 0.007 and cfg.train.crop_size == 513
        assert cfg.train.label_mode == "upsample" and cfg.test.flip and len(cfg.test.scales) == 6
    elif end_to_end:  # from the trained net, at the rate its schedule ended on; the CRF layer at its own rate
        assert cfg.train.base_lr == 1e-5 and cfg.train.lr_mult == {"crf": [100, 100]} and cfg.model.init.name == "final.pth"
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


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=true", "key 'train.batch_size' must be int, got True"),
    ("train.iterations=1.5", "key 'train.iterations' must be int, got 1.5"),
    ("train.mirror=1", "key 'train.mirror' must be bool, got 1"),
    ("train.base_lr=.nan", "key 'train.base_lr' must be float, got nan"),
    ("train.base_lr=.inf", "key 'train.base_lr' must be float, got inf"),
    ("train.base_lr=0", "key 'train.base_lr' must be > 0, got 0"),
    ("train.batch_size=0", "key 'train.batch_size' must be >= 1, got 0"),
    ("train.lr_policy=linear", "key 'train.lr_policy' must be 'step' or 'poly', got 'linear'"),
    ("train.crop_size=0", "key 'train.crop_size' must be a positive number of pixels (or null: the release's crop), got 0"),
    ("train.output_stride=12", "key 'train.output_stride' must be 8, 16 or 32, got 12"),
    ("test.scales=[1.0, x]", "key 'test.scales[1]' must be float, got 'x'"),
    ("test.scales=[]", "key 'test.scales' must be a non-empty list of positive factors, got []"),
    ("model.multi_grid=[1, x]", "key 'model.multi_grid' must be list of int or null, got [1, 'x']"),
    ("data.palette=[[1, 2, x]]", "key 'data.palette' must be list of list of int or null, got [[1, 2, 'x']]"),
    ("train.lr_mult={fc8: [1, -2]}", "key 'train.lr_mult.fc8' must be [weight_mult, bias_mult], two numbers >= 0, got [1, -2]"),
    ("train=5", "section 'train' must be a mapping, got 5"),
    ("crf_search.seed=x", "key 'crf_search.seed' must be int, got 'x'"),
])
def test_types_and_limits_name_the_set_and_the_key(override, message, tmp_path):
    """The schema's checks (pydantic: strict ints and bools, floats from ints or PyYAML's ``1e-4`` strings
    but never NaN or infinity, ``Literal`` choices, ``Field`` limits) told as one line: the ``--set`` that
    gave the value, the dotted key, what it must be, the value given."""
    p = _write(tmp_path, "data: {root: data}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert str(e.value) == f"--set {override}: {message}"


def test_unknown_keys_of_one_section_are_named_together_shallowest_first(tmp_path):
    p = _write(tmp_path, "data: {root: data}\ntrain: {iterations: x, itrs: 1, bacth_size: 2}\ncrf_search: {num_imgs: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: unknown key 'train.itrs', 'train.bacth_size' (did you mean 'iter_size'?); "
                                   "known keys here: base_lr, batch_size,")
    p = _write(tmp_path, "data: {root: data}\ncrf_search: {num_imgs: 5}\nsource: x\n")
    with pytest.raises(ConfigError, match=rf"^{p}: unknown key 'source'; known keys here: crf, crf_search, data,"):
        load_config(p)


def test_code_may_set_and_build_sections():
    """Attribute access and assignment work as on plain objects (paths are resolved after loading); a
    section built in code takes the YAML's defaults (split names of voc) and the same checks."""
    from pydantic import ValidationError

    from deeplab_v1.config import DataConfig, ExperimentConfig, TrainConfig

    cfg = ExperimentConfig()
    cfg.output_dir, cfg.data.root = Path("/x/run"), Path("/x/data")
    assert cfg.run_dir == Path("/x/run") and to_dict(cfg)["data"]["root"] == "/x/data"
    assert (DataConfig().train_list, DataConfig().test_list) == ("train", "val")
    assert DataConfig(layout="folder", images="i", labels="l").train_list is None
    assert TrainConfig(base_lr="1e-4").base_lr == pytest.approx(1e-4)
    with pytest.raises(ValidationError):
        TrainConfig(batch_size=True)
