"""`python -m bitalloc.cli`: the `bitalloc` command."""

import sys

from bitalloc.cli import main

sys.exit(main())
