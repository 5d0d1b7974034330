"""``python -m qfv_brevitas``: the ``qfv`` command."""
import sys

from qfv_brevitas.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
