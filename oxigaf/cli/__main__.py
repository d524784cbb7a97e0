"""``python -m oxigaf.cli``: the ``oxigaf`` command."""

import sys

from . import main

sys.exit(main())
