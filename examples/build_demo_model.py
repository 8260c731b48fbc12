"""Build a chipscale demo model (a hand-made land-cover heuristic) as TorchScript.

python examples/build_demo_model.py [-o examples/demo-model.pt]
python examples/build_demo_model.py --task segmentation [-o examples/demo-segmentation.pt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from chipscale.models import demo_model, demo_segmentation

HERE = Path(__file__).resolve().parent
#: What each task builds, and where by default.
BUILDS = {
    "classification": (demo_model.build, HERE / "demo-model.pt"),
    "segmentation": (demo_segmentation.build, HERE / "demo-segmentation.pt"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task",
        choices=sorted(BUILDS),
        default="classification",
        help="classification: per-tile cover fractions (the default); segmentation: a class "
        "per pixel, with a 16 px margin",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="where to write the model file (default: examples/demo-model.pt, or "
        "examples/demo-segmentation.pt with --task segmentation)",
    )
    args = parser.parse_args(argv)
    build, default = BUILDS[args.task]
    print(build(args.output or default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
