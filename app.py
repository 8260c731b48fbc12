"""CDK app entry point (cdk.json points here): ``npx cdk synth | deploy | destroy``.

The deployment config is cdk.json's context, overridable with ``-c key=value``; see
docs/deploy.md for the keys and stacks/README.md for the constructs.
"""

from __future__ import annotations

import sys

from stacks.config import ConfigError
from stacks.stack import create_app


def main() -> None:
    try:
        app = create_app()
    except ConfigError as exc:
        sys.exit(str(exc))  # one readable message naming each bad key, no traceback
    app.synth()


if __name__ == "__main__":
    main()
