"""``python -m surge.bench ...`` runs ``surge bench ...``."""

import sys

from surge.bench.cli import main

sys.exit(main())
