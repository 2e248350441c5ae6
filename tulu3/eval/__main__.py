"""``python -m tulu3.eval``: generate with a policy, verify, report (tulu3.eval.generate)."""

import sys

from tulu3.config import run_command
from tulu3.eval.generate import main

sys.exit(run_command(main, "tulu3.eval"))
