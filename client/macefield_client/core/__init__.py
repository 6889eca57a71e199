"""The client core: channel and retry policy, errors, results, the shared call logic and the two clients.

* :mod:`.channel`: targets, TLS, tokens, environment variables, :class:`RetryPolicy`;
* :mod:`.errors`: the exceptions (each names the server target);
* :mod:`.results`: :class:`Result`;
* :mod:`.calls`: request building, ``predict_many`` chunking, retries and session steps, written once;
* :mod:`.client` (:class:`Client`, :class:`Session`) and :mod:`.aio` (:class:`AsyncClient`,
  :class:`AsyncSession`): the blocking and asyncio transports of those calls;
* :mod:`.progress`: the progress bar of ``predict_many``.
"""

from .aio import AsyncClient, AsyncSession
from .channel import (
                     DEFAULT_TARGET,
                     DEFAULT_TIMEOUT,
                     ENVIRONMENT,
                     RetryPolicy,
                     TLSConfig,
)
from .client import Client, Session
from .errors import (
                     AuthenticationError,
                     ExtrapolationError,
                     ExtrapolationWarning,
                     FieldFromFileWarning,
                     InvalidRequest,
                     MACEFieldError,
                     RequestTimeout,
                     ResourceExhausted,
                     ServerUnavailable,
)
from .results import Result

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "ENVIRONMENT", "AsyncClient", "AsyncSession", "AuthenticationError",
           "Client", "ExtrapolationError", "ExtrapolationWarning", "FieldFromFileWarning",
           "InvalidRequest", "MACEFieldError", "RequestTimeout",
           "ResourceExhausted", "Result", "RetryPolicy", "ServerUnavailable", "Session", "TLSConfig"]
