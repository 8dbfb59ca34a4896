"""``python -m mpkir``."""

import sys

from mpkir.cli import main

if __name__ == "__main__":
    sys.exit(main())
