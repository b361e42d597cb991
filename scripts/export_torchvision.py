"""Save torchvision classifiers as ExportedPrograms (``.pt2``) for ``python -m surgery bench PATH
--judged`` and ``apply PATH``: models beyond the four the project ships adapters for, with the
operators they bring (depthwise and grouped convolutions, GELU, a class token's 197 rows,
channel counts of no whole vectors, long concatenations, shifted windows).

    python scripts/export_torchvision.py                     # the ten below, into out/torchvision/
    python scripts/export_torchvision.py vit_b_16 --out DIR

Weights are torchvision's random initialisation, seeded (no download); inputs 1x3x224x224.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

MODELS = (
    "resnet50",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
    "convnext_tiny",
    "resnext50_32x4d",
    "regnet_y_800mf",
    "shufflenet_v2_x1_0",
    "densenet121",
    "swin_t",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models", nargs="*", default=list(MODELS), help=f"torchvision model names (default: {' '.join(MODELS)})"
    )
    parser.add_argument("--out", default="out/torchvision", help="directory for NAME.pt2 (default: out/torchvision)")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in torchvision.models.list_models(torchvision.models)]
    if unknown:
        print(f"export_torchvision: error: unknown torchvision classifier {unknown[0]!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        torch.manual_seed(args.seed)
        model = torchvision.models.get_model(name).eval()
        with torch.no_grad():
            program = torch.export.export(model, (torch.randn(1, 3, 224, 224),))
        path = out / f"{name}.pt2"
        torch.export.save(program, path)
        print(f"{path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
