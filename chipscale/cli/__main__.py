"""``python -m chipscale.cli``."""

from chipscale.cli import main

if __name__ == "__main__":
    main()
