"""`python -m ddpm ...` runs the `ddpm` command (see ddpm.cli)."""

import sys

from .cli import main

sys.exit(main())
