"""``python -m paints_undo``: see ``paints_undo.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
