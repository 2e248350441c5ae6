"""``python -m tulu3.plan``: the parallel-layout planner
(the command's home is :mod:`tulu3.planner.cli`)."""

import sys

from tulu3.config import run_command
from tulu3.planner.cli import main

if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.plan"))
