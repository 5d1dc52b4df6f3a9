"""``python3 -m inspector``: the espfix-inspect command line."""

import sys

from .cli import main

sys.exit(main())
