"""Build the chipscale demo model (a hand-made land-cover heuristic) as TorchScript.

python examples/build_demo_model.py [-o examples/demo-model.pt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from chipscale.models.demo_model import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "demo-model.pt",
        help="where to write the model file (default: examples/demo-model.pt)",
    )
    args = parser.parse_args(argv)
    print(build(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
