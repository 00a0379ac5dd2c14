"""``python -m libqblock``: the ``qblock`` command."""

import sys

from .cli import main

sys.exit(main())
