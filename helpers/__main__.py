"""`python -m helpers STEP ...`: the notebooks' steps as commands (helpers/commands.py)."""
import sys

from .commands import main

sys.exit(main())
