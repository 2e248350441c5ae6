"""``python -m tulu3.eval_preferences``: a reward model's accuracy on preference
pairs (the command's home is :mod:`tulu3.eval.preferences`)."""

import sys

from tulu3.config import run_command
from tulu3.eval.preferences import main

if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.eval_preferences"))
