"""`python -m halkspeech` runs the CLI."""

import sys

from halkspeech.cli import main

if __name__ == "__main__":
    sys.exit(main())
