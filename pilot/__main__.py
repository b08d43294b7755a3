"""`python -m pilot --config FILE`: the program a pilot job runs (pilot.main)."""

import sys

from pilot.main import main

sys.exit(main())
