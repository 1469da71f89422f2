"""``python -m dormant ...`` is the ``dormant`` command (also ``torchrun -m dormant run ...``)."""
import sys

from .cli import main

sys.exit(main())
