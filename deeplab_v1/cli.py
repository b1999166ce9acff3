"""The ``deeplab`` command: ``run`` (every stage of an experiment) and one subcommand per stage.

    deeplab run [EXPERIMENT] [--set key=value ...] [--redo STAGE ...]
    deeplab train|test|crf-search|crf|evaluate EXPERIMENT [--set ...] [--redo]
    deeplab predict IMAGE... --weights CK.pth [--crf] [--params w1=..,..] --out DIR
    deeplab compare RUN_DIR... [--out DIR]
    deeplab config EXPERIMENT [--set key=value ...]
    deeplab convert IN.caffemodel OUT.pth --model NAME
    deeplab --version

EXPERIMENT is a YAML file or the name of a packaged experiment (``default``, ``crf-demo``, the
``voc12-*`` files): the repository's ``experiments/`` folder, installed as the resource package
``deeplab_v1.experiments`` and read through ``importlib.resources``, so a wheel runs offline. With no
experiment, ``run`` uses ``default``: a short LargeFOV run on the real VOC images shipped in
``experiments/sample``. Runs go to ``./runs/<name>`` under the current folder unless the experiment sets
``output_dir``.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from . import experiment_files
from .config import STAGES, ConfigError, load_config
from .errors import DeepLabError

#: The packaged experiment ``deeplab run`` runs with no argument.
DEFAULT_EXPERIMENT_NAME = "default"


def packaged_experiments() -> Path:
    """The folder of the packaged experiments (``experiment_files.packaged_experiments``).

    Raises:
        ConfigError: the package is not installed as files, or without its experiments.
    """
    try:
        return experiment_files.packaged_experiments()
    except experiment_files.ExperimentFileError as exc:
        raise ConfigError(str(exc)) from None


def packaged_experiment_names() -> list[str]:
    """Names ``deeplab run NAME`` accepts without a path (the packaged ``*.yaml``, without the suffix)."""
    return sorted(p.stem for p in packaged_experiments().glob("*.yaml"))


def resolve_experiment(arg: Optional[str]) -> Path:
    """The experiment file ``arg`` names: an existing file, else a packaged experiment of that name
    (``crf-demo`` or ``crf-demo.yaml``); None: the packaged default.

    Raises:
        ConfigError: neither a file nor a packaged name (the message lists the packaged names).
    """
    if arg is None:
        arg = DEFAULT_EXPERIMENT_NAME
    path = Path(arg)
    if path.is_file():
        return path
    if path.name == arg:  # a bare name, no folder: look among the packaged experiments
        candidate = packaged_experiments() / (arg if arg.endswith(".yaml") else f"{arg}.yaml")
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{arg}: no such experiment file, nor a packaged experiment of that name "
                      f"(packaged: {', '.join(packaged_experiment_names())})")


def _version() -> str:
    try:
        return metadata.version("deeplab-v1")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return f"{__version__} (not installed)"


def _names_help() -> str:
    """The packaged names for ``--help`` (empty when the package's experiments cannot be listed)."""
    try:
        return ", ".join(packaged_experiment_names())
    except ConfigError:
        return "none installed"


def _add_common(p: argparse.ArgumentParser, optional_experiment: bool = False) -> None:
    names = _names_help()
    if optional_experiment:
        p.add_argument("experiment", nargs="?", default=None,
                       help=f"experiment YAML file or packaged name (default: {DEFAULT_EXPERIMENT_NAME}; packaged: {names})")
    else:
        p.add_argument("experiment", help=f"experiment YAML file or packaged name (packaged: {names})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=100 (repeatable; YAML values)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLab v1 experiments: train, test, CRF, search, evaluate.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every stage of an experiment (skips finished stages)")
    _add_common(p, optional_experiment=True)
    p.add_argument("--redo", action="append", default=[], choices=STAGES, metavar="STAGE",
                   help=f"rerun this stage and the ones after it ({', '.join(STAGES)})")
    helps = {
        "train": "train the network (resumes from the last checkpoint)",
        "test": "compute and cache the stride-8 scores and the DCNN predictions",
        "crf-search": "grid-search the CRF parameters w1, sigma_alpha, sigma_beta on cached scores",
        "crf": "run the fully connected CRF on the cached scores",
        "evaluate": "mIoU, pixel accuracy, trimap and report.md",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        p.add_argument("--redo", action="store_true", help="run the stage even if it is done")
        if name in ("crf", "crf-search"):
            p.add_argument("--backend", choices=["auto", "pydensecrf", "torch"], help="CRF backend (overrides the YAML; auto: torch when it fits the memory budget)")
            p.add_argument("--device", choices=["cpu", "cuda"], help="device of the torch CRF backend")
    p = sub.add_parser("convert", help="convert a .caffemodel (release or ImageNet VGG-16) into a checkpoint",
                       add_help=False)
    text = "segment JPEG/PNG images with a checkpoint: label PNGs (DCNN, and DCNN-CRF with --crf) and an overlay"
    p = sub.add_parser("predict", help=text, description=text)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files, any size")
    p.add_argument("--weights", required=True, help="a checkpoint of ours (final.pth, iter_<N>.pth, deeplab convert's)")
    p.add_argument("--model", help="model name (default: the one the checkpoint records)")
    p.add_argument("--num-classes", type=int, help="fc8 classes (default: the checkpoint's record, else 21)")
    p.add_argument("--crf", action="store_true", help="also run the fully connected CRF")
    p.add_argument("--params", metavar="w1=..,sigma_alpha=..", help="CRF parameters on top of the checkpoint's "
                   "run's fitted CRF (crf_search/learned.json, unless the run set crf.use_learned: false), else its "
                   "search best (crf_search/best.json), else the release's LargeFOV values")
    p.add_argument("--out", required=True, help="output folder: dcnn/, crf/, overlay/, predict.json")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--crf-backend", help="auto (default: torch when it fits the memory budget, else pydensecrf), "
                   "torch or pydensecrf")
    p.add_argument("--crf-memory-mb", type=float, help="the torch CRF's memory budget, MiB (auto takes pydensecrf for "
                   "an image that does not fit; default: half the memory, at most 4096)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--size", type=int, help="test padding in pixels (default: the release's, 513 or 514)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    text = "print the resolved configuration of an experiment (its bases merged, --set applied, paths absolute) as YAML"
    p = sub.add_parser("config", help=text, description=text)
    _add_common(p)
    text = "compare evaluated runs: one markdown table and one trimap figure (paper Table 1, Fig. 5)"
    p = sub.add_parser("compare", help=text, description=text)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with metrics.json and trimap.json")
    p.add_argument("--out", default=None, help="output folder (default: ./runs/compare)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from .weights.convert import main as convert_main

        return int(convert_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command in ("predict", "compare"):
        return _guarded(args, lambda: _predict(args) if args.command == "predict" else _compare(args))
    # a relative path given on the command line is the user's: from the current folder, never from the
    # experiment file's (a packaged experiment's folder is inside the installed package)
    overrides = [_absolute_path(o) for o in args.overrides]
    if getattr(args, "backend", None):
        section = "crf_search" if args.command == "crf-search" else "crf"
        overrides.append(f"{section}.backend={args.backend}")
    if getattr(args, "device", None):
        section = "crf_search" if args.command == "crf-search" else "crf"
        overrides.append(f"{section}.device={args.device}")

    def work() -> None:
        from .runner import Runner

        cfg = load_config(resolve_experiment(args.experiment), overrides)
        if args.command == "config":
            print(config_yaml(cfg), end="")
        elif args.command == "run":
            Runner(cfg, progress=not args.no_progress, redo=args.redo).run()
            from .stages.report import headline

            print(headline(cfg), file=sys.stderr)
        else:  # one stage; --redo reruns this stage alone, not the ones after it
            stage = args.command.replace("-", "_")
            Runner(cfg, progress=not args.no_progress, redo_only=[stage] if args.redo else []).run([stage])

    return _guarded(args, work)


def config_yaml(cfg) -> str:
    """The resolved configuration as YAML (``deeplab config``; mmsegmentation's print_config): sections as
    blocks in the schema's order, lists on one line; a file that ``deeplab run`` reads back unchanged."""
    import yaml

    from .config import to_dict

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=110)


#: Keys whose value is a path: given relative on the command line, they are taken from the current folder.
PATH_KEYS = experiment_files.PATH_KEYS


def _absolute_path(override: str) -> str:
    """``KEY=REL`` -> ``KEY=<cwd>/REL`` for the path keys (``PATH_KEYS``; a list is a path when it ends in
    ``.txt``, else a split name); other overrides unchanged. In an experiment file relative paths are taken
    from the file's folder; on the command line they are the user's, from where the command runs."""
    key, sep, value = override.partition("=")
    key, value = key.strip(), value.strip()
    if key not in PATH_KEYS or not sep or not value or value in ("null", "~") or Path(value).expanduser().is_absolute():
        return override
    if key.startswith("data.") and key.endswith("_list") and not value.endswith(".txt"):
        return override
    return f"{key}={(Path.cwd() / value).resolve()}"


def _predict(args: argparse.Namespace) -> None:
    from .predict import predict_images

    predict_images(args.images, args.weights, args.out, model=args.model, num_classes=args.num_classes,
                   use_crf=args.crf, params=args.params, device=args.device, crf_backend=args.crf_backend,
                   batch_size=args.batch_size, size=args.size, progress=not args.no_progress,
                   crf_memory_mb=args.crf_memory_mb, log=lambda line: print(line, file=sys.stderr))


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare_runs

    out = Path(args.out) if args.out else Path.cwd() / "runs" / "compare"
    text, written = compare_runs(args.runs, out)
    print(text)
    print(f"compare: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)


def _guarded(args: argparse.Namespace, work) -> int:
    """Run ``work()``; a user error is one line with exit status 2, an internal fault one line with 1."""
    try:
        work()
    except (DeepLabError, OSError) as exc:  # bad input, or a file the system refused (permissions, disk)
        if args.debug:
            raise
        print(f"deeplab: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deeplab: interrupted (a rerun resumes where it stopped)", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal fault: one line, and how to see and report it
        if args.debug:
            raise
        print(f"deeplab: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    """An error's message on one line (multi-line messages joined with ' | ')."""
    text = str(exc) or type(exc).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
