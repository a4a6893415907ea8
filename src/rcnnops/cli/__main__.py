"""``python -m rcnnops.cli``: the stage and registry commands (torchrun starts
``train`` this way). The full ``rcnnops`` command adds ``run`` and ``schedule``."""

from rcnnops.cli import exit_now, main

exit_now(main())
