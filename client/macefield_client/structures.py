"""Moved to :mod:`macefield_client.data.structures`; this module re-exports it for the old import path."""

from .data.structures import *
from .data.structures import __all__  # noqa: F401
