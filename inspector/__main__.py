"""``python3 -m inspector``: the espfix-inspect command line."""

import sys

from . import prefetch

if prefetch.live_argv(sys.argv[1:]):
    prefetch.start()         # the kernel formats /proc/kallsyms while Python imports

from .cli import main  # noqa: E402

sys.exit(main())
