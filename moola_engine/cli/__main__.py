"""``python -m moola_engine.cli``: the ``moola-engine`` command."""

import sys

from moola_engine.cli import main

sys.exit(main())
