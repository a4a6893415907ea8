"""``python -m rcnnops.cli``: the stage and registry commands (torchrun starts
``train`` this way). The full ``rcnnops`` command adds ``run`` and ``schedule``."""

import sys

from rcnnops.cli import main

sys.exit(main())
