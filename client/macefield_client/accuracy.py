"""Moved to :mod:`macefield_client.contract.accuracy`; this module re-exports it for the old import path."""

from .contract.accuracy import *
from .contract.accuracy import __all__  # noqa: F401
