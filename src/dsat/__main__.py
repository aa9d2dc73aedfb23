"""``python -m dsat`` is the ``dsat`` command."""

import sys

from dsat.cli import main

sys.exit(main())
