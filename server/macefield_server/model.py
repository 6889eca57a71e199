"""The engine's public API under its earlier name: ``from macefield_server.model import predict, load_model, ...``.

New code imports :mod:`macefield_server.engine`; this module keeps scripts written for the old path working.
"""

from .engine import *  # noqa: F401,F403
from .engine import __all__  # noqa: F401
