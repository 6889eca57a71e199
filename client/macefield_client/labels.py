"""Reference labels in data files: the wire contract's :mod:`macefield_client.contract.labels`, re-exported."""

from .contract.labels import *  # noqa: F401,F403
from .contract.labels import __all__  # noqa: F401
