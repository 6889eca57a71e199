"""Moved to :mod:`macefield_client.core.errors`; this module re-exports it for the old import path."""

from .core.errors import *
from .core.errors import __all__  # noqa: F401
