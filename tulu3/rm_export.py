"""``python -m tulu3.rm_export``: a reward model to HF
(the command's home is :mod:`tulu3.stages.rm.export`)."""

import sys

from tulu3.config import run_command
from tulu3.stages.rm.export import main

if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.rm_export"))
