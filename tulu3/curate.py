"""``python -m tulu3.curate``: data curation
(the command's home is :mod:`tulu3.data.curate`)."""

import sys

from tulu3.config import run_command
from tulu3.data.curate import main

if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.curate"))
