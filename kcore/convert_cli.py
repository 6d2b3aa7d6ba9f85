"""The ``kcore convert`` command: a bare state dict into a named architecture, saved as safetensors + model card.

    kcore convert weights.pth --arch resnet18 --out resnet18.safetensors
    kcore convert other_codebase.pth --arch timm:efficientnet_b0 --match order --out b0.safetensors
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kcore.arguments import ArgumentError

SPELLINGS: dict[str, str] = {
    "arch": "--arch {value}", "num_classes": "--num-classes {value}", "match": "--match {value}",
    "strict": "--non-strict", "input_size": "--input-size {value}", "overwrite": "--overwrite", "out": "--out {value}",
}
"""How ``kcore convert`` names the arguments of :func:`kcore.convert.convert_state_dict` in its errors."""

EPILOG = """\
matching (--match):
  auto   by name when every tensor of the architecture is found by name (after removing the prefixes
         'module.'/'model.'), else by order and shape (default)
  name   by name only
  order  the i-th tensor of the file with the i-th of the architecture, in state-dict order, shapes equal;
         refused on any ambiguity: different counts, a shape that differs at some position, names that say
         another order than the positions, or a safetensors file (it does not keep the saved order)

Which option fixes what: --match order when the file names its tensors differently; --non-strict when the
file holds extra tensors (an EMA copy, an auxiliary head) or, with --match name, to load only the tensors whose
names match; --num-classes when the classifier's shape differs. The output is checked with one forward pass and
written with a model card beside it (OUT.card.json), so `kcore layers OUT` and `kcore fit --a OUT` need no
--arch.
"""


def add_cli(sub: Any) -> None:
    """Register ``kcore convert`` on the ``kcore`` command's subparsers."""
    from kcore.convert import MATCH_MODES

    p = sub.add_parser(
        "convert", help="map a bare state dict onto a named architecture and save it as safetensors + model card",
        description="Load a weights-only state dict (a .pt/.pth/.bin torch.save file read weights-only, or "
        "safetensors) into an architecture by tensor name or by order and shape, check it with a forward pass, "
        "and write OUT (safetensors) and OUT's model card.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="the state dict to convert")
    p.add_argument("--arch", required=True, metavar="ARCH",
                   help="architecture to load it into (e.g. resnet18, vgg16_bn, timm:NAME)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="classifier outputs (default: from the file's last 2-D .weight)")
    p.add_argument("--match", default="auto", choices=list(MATCH_MODES), help="how tensors are matched (default auto)")
    p.add_argument("--non-strict", action="store_true",
                   help="leave out the file's extra tensors; with --match name, also leave tensors the file lacks as "
                   "built (random); the report lists both")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size of the checking forward pass, also written to the card (default: the "
                   "architecture's standard, else 224 224)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its card if they exist")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="the file to write (its card goes beside it)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Convert, write, and print the report (the handler of ``kcore convert``)."""
    from pathlib import Path

    from kcore.convert import convert_state_dict, write_converted

    if not Path(args.src).is_file():
        raise ValueError(f"SRC {args.src!r} does not exist. Fix: check the path (relative to {Path.cwd()}).")
    size = tuple(args.input_size) if args.input_size else None
    try:
        result = convert_state_dict(args.src, args.arch, num_classes=args.num_classes, match=args.match,
                                    strict=not args.non_strict, input_size=size)
        weights, card = write_converted(result, args.out, card=result.card(size), overwrite=args.overwrite)
    except ArgumentError as exc:
        raise exc.respelled(SPELLINGS) from exc
    for line in result.report_lines():
        print(line)
    if result.missing:
        print(f"warning: {len(result.missing)} tensor(s) of {args.arch} are not in the file and stay as built "
              "(random initialisation)", file=sys.stderr)
    print(f"wrote {weights} and {card}")
    return 0
