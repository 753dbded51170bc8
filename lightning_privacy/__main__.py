"""``python -m lightning_privacy`` runs the console script."""

import sys

from lightning_privacy.cli import main

if __name__ == "__main__":
    sys.exit(main())
