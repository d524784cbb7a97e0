"""``python -m oxigaf.serve``: the same as ``oxigaf serve``."""

import sys

from . import main

sys.exit(main())
