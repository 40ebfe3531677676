"""`python -m halkspeech` runs the CLI."""

import sys

from halkspeech.cli import main

sys.exit(main())
