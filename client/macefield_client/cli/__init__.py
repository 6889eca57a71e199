"""The command lines: ``macefield`` (:mod:`.main`), ``macefield-ipi`` (:mod:`.ipi`) and what they share
(:mod:`.common`: server options, the client they make, exit codes).  ``macefield_client.cli:main`` is
``macefield``; ``python -m macefield_client.cli`` runs it too."""

from .common import InputError, positive_int
from .main import *
from .main import __all__ as _commands

__all__ = ["InputError", "positive_int"] + list(_commands)
