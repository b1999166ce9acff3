"""The ``deeplab`` command: ``run`` (every stage of an experiment) and one subcommand per stage.

    deeplab run [EXPERIMENT.yaml] [--set key=value ...] [--redo STAGE ...]
    deeplab train|test|crf-search|crf|evaluate EXPERIMENT.yaml [--set ...] [--redo]
    deeplab convert IN.caffemodel OUT.pth --model NAME

With no experiment, ``run`` uses ``experiments/default.yaml``: a short LargeFOV run on the real VOC
images shipped in ``experiments/sample``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .config import STAGES, load_config
from .errors import DeepLabError

DEFAULT_EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


def _add_common(p: argparse.ArgumentParser, optional_experiment: bool = False) -> None:
    if optional_experiment:
        p.add_argument("experiment", nargs="?", type=Path, default=None,
                       help=f"experiment YAML (default: {DEFAULT_EXPERIMENT.parent.name}/{DEFAULT_EXPERIMENT.name})")
    else:
        p.add_argument("experiment", type=Path, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=100 (repeatable; YAML values)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLab v1 experiments: train, test, CRF, search, evaluate.")
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
            p.add_argument("--backend", choices=["pydensecrf", "torch"], help="CRF backend (overrides the YAML)")
            p.add_argument("--device", choices=["cpu", "cuda"], help="device of the torch CRF backend")
    p = sub.add_parser("convert", help="convert a .caffemodel (release or ImageNet VGG-16) into a checkpoint",
                       add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from .weights.convert import main as convert_main

        return int(convert_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    experiment = args.experiment or DEFAULT_EXPERIMENT
    overrides = list(args.overrides)
    if getattr(args, "backend", None):
        section = "crf_search" if args.command == "crf-search" else "crf"
        overrides.append(f"{section}.backend={args.backend}")
    if getattr(args, "device", None):
        section = "crf_search" if args.command == "crf-search" else "crf"
        overrides.append(f"{section}.device={args.device}")
    from .runner import Runner

    try:
        cfg = load_config(experiment, overrides)
        if args.command == "run":
            Runner(cfg, progress=not args.no_progress, redo=args.redo).run()
        else:  # one stage; --redo reruns this stage alone, not the ones after it
            stage = args.command.replace("-", "_")
            Runner(cfg, progress=not args.no_progress, redo_only=[stage] if args.redo else []).run([stage])
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
