"""``python -m lightning_privacy`` runs the console script."""

import sys

from lightning_privacy.cli import main

sys.exit(main())
