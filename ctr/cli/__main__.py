"""``python -m ctr.cli`` (and ``torchrun -m ctr.cli``): the ``ctr`` command."""

import sys

from ctr.cli.main import main

sys.exit(main())
