"""Moved to :mod:`macefield_client.md.ipi` (the driver) and :mod:`macefield_client.cli.ipi` (``macefield-ipi``,
also ``python -m macefield_client.ipi``); this module re-exports both for the old import path."""

from .cli.ipi import main, parse_args  # noqa: F401
from .md.ipi import *

if __name__ == "__main__":
    raise SystemExit(main())
