"""Write a DeepLab v1 model's weights as a Caffe ``.caffemodel``, in the release's old layout (``V1``,
``NetParameter.layers``) or the later one (``V2``, ``NetParameter.layer``), without Caffe.

    python tools/make_caffemodel.py OUT.caffemodel --model deeplab-largefov [--num-classes 21]
        [--from CHECKPOINT.pth] [--format V1|V2] [--fc8-name fc8_voc12] [--seed 0]

With ``--from`` the weights come from a checkpoint of ours (``state_dict`` or ``model_state``); without,
they are the model's seeded initialisation (known tensors, for testing ``deeplab convert`` end to end).
Only parameter layers are written (Convolution, weight (out, in, kh, kw) + bias (out,)); the network
definition stays in the prototxt. fc8 is named ``--fc8-name`` as in the release (``fc8_voc12``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from deeplab_v1.models import build_model  # noqa: E402
from deeplab_v1.models.vgg import SPECS  # noqa: E402
from deeplab_v1.weights.caffemodel import CaffeModelError, read_caffemodel  # noqa: E402
from deeplab_v1.weights.checkpoint import checkpoint_state_dict, load_checkpoint  # noqa: E402
from deeplab_v1.weights.errors import WeightsError  # noqa: E402
from deeplab_v1.weights.export import export_caffemodel  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 when the checkpoint does not fit)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help=".caffemodel to write")
    parser.add_argument("--model", required=True, choices=sorted(SPECS), help="DeepLab v1 variant")
    parser.add_argument("--num-classes", type=int, default=21, help="classes of fc8 (default 21)")
    parser.add_argument("--from", dest="checkpoint", type=Path, help="checkpoint of ours to export")
    parser.add_argument("--format", choices=["V1", "V2"], default="V1", help="Caffe layout (default V1, as the release)")
    parser.add_argument("--fc8-name", default="fc8_voc12", help="name of the classifier layer (default fc8_voc12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights when no --from is given")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.num_classes)
    try:
        if args.checkpoint is not None:
            model.load_state_dict(checkpoint_state_dict(load_checkpoint(args.checkpoint)))
        export_caffemodel(model, args.out, format=args.format, fc8_name=args.fc8_name, name=args.model)
        net = read_caffemodel(args.out)  # check what was written
    except (WeightsError, CaffeModelError, RuntimeError) as exc:  # RuntimeError: load_state_dict mismatch
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = sum(b.size for layer in net.layers for b in layer.blobs)
    print(f"wrote {args.out}: {net.format}, {len(net.layers)} layers, {params / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
