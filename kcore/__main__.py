"""``python -m kcore`` (and ``torchrun ... -m kcore``): the ``kcore`` command."""
import sys

from kcore.cli import main

if __name__ == "__main__":  # (not when a tool imports every module, e.g. pkgutil.walk_packages)
    sys.exit(main())
