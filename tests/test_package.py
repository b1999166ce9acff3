"""The installable package: the experiments and the sample are package data (``deeplab_v1.experiments``),
packaged experiments resolve by name, runs go under the current folder, ``deeplab --version``; and (slow)
a wheel installed into a fresh virtual environment runs ``deeplab run`` and ``deeplab run crf-demo`` from an
empty folder."""

from __future__ import annotations

import fnmatch
import json
import os
import site
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image
from setuptools import find_namespace_packages

from deeplab_v1.cli import main, packaged_experiment_names, packaged_experiments, resolve_experiment
from deeplab_v1.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
#: What ``experiments/`` holds that is not for the package: run folders of old defaults, caches.
NOT_SHIPPED = ("runs", "__pycache__")


def _setuptools_table() -> dict:
    """``[tool.setuptools]`` of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _experiment_folders() -> list[Path]:
    root = REPO / "experiments"
    return [root] + sorted(p for p in root.rglob("*") if p.is_dir()
                           and not set(p.relative_to(root).parts) & set(NOT_SHIPPED))


def test_packages_list_is_the_source_tree():
    """The explicit ``packages`` list holds every code package and every folder of experiments/."""
    code = set(find_namespace_packages(where=str(REPO), include=["deeplab_v1*", "crf*"]))
    code = {p for p in code if "__pycache__" not in p}
    data = {".".join(("deeplab_v1", *f.relative_to(REPO).parts)) for f in _experiment_folders()}
    table = _setuptools_table()
    assert set(table["packages"]) == code | data
    assert table["package-dir"] == {"deeplab_v1.experiments": "experiments"}


def test_package_data_holds_every_experiment_and_sample_file():
    """Every file of experiments/ (YAML, the sample's images, labels, lists, README) matches a package-data
    pattern of its folder's package, so the wheel carries it."""
    patterns = _setuptools_table()["package-data"]
    missing = []
    for folder in _experiment_folders():
        package = ".".join(("deeplab_v1", *folder.relative_to(REPO).parts))
        for f in folder.iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc"):
                if not any(fnmatch.fnmatch(f.name, pat) for pat in patterns.get(package, [])):
                    missing.append(str(f.relative_to(REPO)))
    assert not missing
    assert (packaged_experiments() / "sample" / "VOC2012" / "JPEGImages").is_dir()


def test_packaged_experiments_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: nothing named crf-demo here
    assert resolve_experiment(None) == packaged_experiments() / "default.yaml"
    assert resolve_experiment("crf-demo") == packaged_experiments() / "crf-demo.yaml"
    assert resolve_experiment("crf-demo.yaml") == packaged_experiments() / "crf-demo.yaml"
    assert {"default", "crf-demo", "voc12-deeplab-largefov"} <= set(packaged_experiment_names())
    with pytest.raises(ConfigError, match="no-such-experiment.*packaged: .*crf-demo"):
        resolve_experiment("no-such-experiment")
    # a file of that name in the current folder wins over the packaged one
    (tmp_path / "crf-demo").write_text("name: mine\n")
    assert resolve_experiment("crf-demo") == Path("crf-demo")


def test_unknown_experiment_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "no-such-experiment"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deeplab: error: no-such-experiment") and "crf-demo" in err[0]


def test_runs_go_under_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(resolve_experiment(None)).output_dir == tmp_path.resolve() / "runs" / "default"
    assert load_config(resolve_experiment("crf-demo")).output_dir == tmp_path.resolve() / "runs" / "crf-demo"
    # an experiment's own output_dir still wins (relative to its file)
    exp = tmp_path / "exp" / "mine.yaml"
    exp.parent.mkdir()
    exp.write_text(f"base: {packaged_experiments() / 'default.yaml'}\nname: mine\noutput_dir: out/here\n")
    assert load_config(exp, check_paths=False).output_dir == (exp.parent / "out" / "here").resolve()


def test_relative_paths_on_the_command_line_are_from_the_current_folder(tmp_path, monkeypatch):
    from deeplab_v1.cli import _absolute_path

    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert _absolute_path("output_dir=mine") == f"output_dir={here / 'mine'}"
    assert _absolute_path("model.init=runs/a/final.pth") == f"model.init={here / 'runs' / 'a' / 'final.pth'}"
    assert _absolute_path("data.root=VOC2012") == f"data.root={here / 'VOC2012'}"
    assert _absolute_path("data.test_list=lists/val.txt") == f"data.test_list={here / 'lists' / 'val.txt'}"
    assert _absolute_path("data.test_list=val") == "data.test_list=val"  # a split name, not a path
    assert _absolute_path("output_dir=/abs/x") == "output_dir=/abs/x"
    assert _absolute_path("model.init=null") == "model.init=null"
    assert _absolute_path("train.iterations=3") == "train.iterations=3"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"deeplab {metadata.version('deeplab-v1')}"


def test_crf_demo_is_diagnostic_without_training():
    cfg = load_config(resolve_experiment("crf-demo"))
    assert cfg.test.score_source == "degraded-gt" and "train" not in cfg.stages
    assert cfg.data.root == (packaged_experiments() / "sample" / "VOC2012").resolve()
    assert cfg.crf_search.enabled and cfg.crf_search.search.objective == "trimap_miou"


# ------------------------------------------------------------------------------------ the wheel, slow
def _fresh_venv_with_wheel(tmp_path: Path) -> Path:
    """A new virtual environment with the wheel of this checkout installed (no dependency downloaded:
    the wheel is built with the running interpreter's setuptools, and the dependencies are those of the
    running environment, seen through a .pth file). Returns its bin folder."""
    try:
        import setuptools  # noqa: F401  (the build backend, needed offline)
    except ImportError:  # pragma: no cover
        pytest.skip("setuptools is not installed: the wheel cannot be built offline")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.skip(f"pip wheel could not build the package here: {build.stderr.strip().splitlines()[-1:]}")
    (wheel,) = wheels.glob("deeplab_v1-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the running environment's dependencies (torch, ...), after the new venv's own site-packages
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "_parent_env.pth").write_text("\n".join(parents) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:  # pip < 22.3 has no --python: install with the target's own pip
        install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                                 capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return bin_dir


@pytest.mark.slow
def test_wheel_runs_default_and_crf_demo_from_an_empty_folder(tmp_path):
    bin_dir = _fresh_venv_with_wheel(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    def deeplab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "deeplab"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1200)

    where = subprocess.run([str(bin_dir / "python"), "-c", "import deeplab_v1; print(deeplab_v1.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "venv") in where and str(REPO) not in where  # the wheel, not the checkout
    assert deeplab("--version").stdout.strip() == f"deeplab {metadata.version('deeplab-v1')}"
    quick = ["train.iterations=1", "train.batch_size=1", "data.max_test_images=2", "crf_search.num_images=2",
             "crf_search.w1=[4]", "crf_search.sigma_alpha=[50]", "crf_search.sigma_beta=[3]", "crf_search.rounds=0"]
    run = deeplab("run", "--no-progress", *[x for o in quick for x in ("--set", o)])
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "runs" / "default" / "report.md").is_file()
    assert "pipeline check" in run.stderr.strip().splitlines()[-1]
    demo = deeplab("run", "crf-demo", "--no-progress", "--set", "data.max_test_images=2",
                   "--set", "crf_search.num_images=2", "--set", "crf_search.w1=[4]")
    assert demo.returncode == 0, demo.stderr[-2000:]
    report = (work / "runs" / "crf-demo" / "report.md").read_text()
    assert "DIAGNOSTIC" in report and (work / "runs" / "crf-demo" / "figures" / "trimap.pdf").is_file()
    # predict on an image of the installed sample, with the run's checkpoint and its search's CRF parameters
    image = next((tmp_path / "venv").rglob("deeplab_v1/experiments/sample/VOC2012/JPEGImages/2007_002427.jpg"))
    pred = deeplab("predict", str(image), "--weights", "runs/default/checkpoints/final.pth", "--crf", "--size", "97",
                   "--device", "cpu", "--out", "runs/predict", "--no-progress")
    assert pred.returncode == 0, pred.stderr[-2000:]
    with Image.open(work / "runs" / "predict" / "crf" / "2007_002427.png") as im, Image.open(image) as src:
        assert im.size == src.size and im.mode == "P"
    assert "best.json" in json.loads((work / "runs" / "predict" / "predict.json").read_text())["crf"]["from"]
    cmp = deeplab("compare", "runs/default", "runs/crf-demo")
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "| **mIoU** |" in cmp.stdout and (work / "runs" / "compare" / "trimap.png").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing written beside it
