"""Moved to :mod:`macefield_client.md.ipi_socket`; this module re-exports it for the old import path."""

from .md.ipi_socket import *
from .md.ipi_socket import __all__  # noqa: F401
