"""Moved to :mod:`macefield_client.core.client`; this module re-exports it for the old import path."""

from .core.client import *
from .core.client import __all__  # noqa: F401
