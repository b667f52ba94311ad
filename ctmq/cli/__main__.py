"""python -m ctmq.cli (as torchrun runs it): the `ctmq` command."""

import sys

from . import main

sys.exit(main())
