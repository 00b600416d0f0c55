"""`python -m sslfast ...` is the `sslfast` command."""

import sys

from .cli import main

sys.exit(main())
