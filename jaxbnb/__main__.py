"""`python -m jaxbnb` runs the command line."""

import sys

from jaxbnb._src.tools.cli import main

sys.exit(main())
