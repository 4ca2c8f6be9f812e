"""``python -m captum_dynamiclrp``: same as the ``dynamiclrp`` command."""

import sys

from .cli import main

sys.exit(main())
