"""python -m ctmq.cli (as torchrun runs it): the `ctmq` command."""

import sys

from . import main

if __name__ == "__main__":  # importing the module (pkgutil walks, docs tools) runs nothing
    sys.exit(main())
