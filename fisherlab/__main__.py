"""``python -m fisherlab`` runs the command line."""

import sys

from fisherlab.cli import main

sys.exit(main())
