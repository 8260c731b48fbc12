"""``python -m chipscale.cli``."""

from chipscale.cli import main

main()
