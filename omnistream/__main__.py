"""`python -m omnistream ...` is the `omnistream` command."""

import sys

from omnistream.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
