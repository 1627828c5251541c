#!/usr/bin/env python3
"""Answer a prompt about an image with PaliGemma, in NumPy (or CuPy): the `npvlm` command.

    python run.py                          # the embedded demo model on a bundled sample scene
    python run.py IMAGE PROMPT [--model DIR|ORG/NAME] [options]

A thin wrapper: the program is npvlm/cli.py (`npvlm ...`, `python -m npvlm ...` after install).
"""

import sys

from npvlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
