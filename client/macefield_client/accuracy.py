"""Errors against reference labels: the wire contract's :mod:`macefield_client.contract.accuracy`, re-exported."""

from .contract.accuracy import *  # noqa: F401,F403
from .contract.accuracy import __all__  # noqa: F401
