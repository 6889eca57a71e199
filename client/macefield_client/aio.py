"""Moved to :mod:`macefield_client.core.aio`; this module re-exports it for the old import path."""

from .core.aio import *
from .core.aio import __all__  # noqa: F401
