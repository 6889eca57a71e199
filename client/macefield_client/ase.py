"""Moved to :mod:`macefield_client.md.ase`; this module re-exports it for the old import path."""

from .md.ase import *
from .md.ase import __all__  # noqa: F401
