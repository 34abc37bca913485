"""``python -m loes.cli``: the ``loes`` command."""

import sys

from loes.cli import main

sys.exit(main())
