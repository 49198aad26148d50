"""`python -m hierax` (and `torchrun -m hierax`) runs the CLI."""

import sys

from hierax.cli import main

sys.exit(main())
