"""``python -m kcore`` (and ``torchrun ... -m kcore``): the ``kcore`` command."""
import sys

from kcore.cli import main

sys.exit(main())
