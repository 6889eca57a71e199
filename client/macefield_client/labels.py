"""Moved to :mod:`macefield_client.contract.labels`; this module re-exports it for the old import path."""

from .contract.labels import *
from .contract.labels import __all__  # noqa: F401
