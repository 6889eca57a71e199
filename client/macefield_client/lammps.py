"""Moved to :mod:`macefield_client.md.lammps`; this module re-exports it for the old import path."""

from .md.lammps import *
from .md.lammps import __all__  # noqa: F401
