"""``python -m macefield_client.cli``: the ``macefield`` command."""

import sys

from .main import main

sys.exit(main())
