"""Moved to :mod:`macefield_client.md.fields`; this module re-exports it for the old import path."""

from .md.fields import *
from .md.fields import __all__  # noqa: F401
