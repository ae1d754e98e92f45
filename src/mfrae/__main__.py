"""`python -m mfrae ...` (also what `torchrun -m mfrae ...` runs)."""

import sys

from mfrae.cli import main

sys.exit(main())
