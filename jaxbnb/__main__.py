"""`python -m jaxbnb` runs the command line."""

import sys

from jaxbnb._src.cli import main

sys.exit(main())
