"""``python -m paramsel_demo``: the same as ``paramsel-demo``."""

import sys

from paramsel_demo.launcher import main

sys.exit(main())
