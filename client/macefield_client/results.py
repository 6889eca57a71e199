"""Moved to :mod:`macefield_client.core.results`; this module re-exports it for the old import path."""

from .core.results import *
from .core.results import __all__  # noqa: F401
