"""`python -m npvlm IMAGE PROMPT ...`: the command line (npvlm/cli.py)."""

import sys

from .cli import main

sys.exit(main())
