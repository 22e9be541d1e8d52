"""``python -m mailgate``: the same as the ``mailgate`` command."""

import sys

from mailgate.cli import main

if __name__ == "__main__":
    sys.exit(main())
