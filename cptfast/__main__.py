"""`python -m cptfast ...` is the `cptfast` command (and what torchrun launches)."""

import sys

from cptfast.cli import main

sys.exit(main())
