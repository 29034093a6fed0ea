"""``python -m ffkern`` is the ``ffkern`` command (torchrun -m ffkern ... works too)."""
import sys

from .cli import main

sys.exit(main())
