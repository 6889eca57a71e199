"""Thin client for MACE-Field Serve (grpcio, protobuf and numpy; never torch).

::

    from macefield_client import Client

    with Client("127.0.0.1:50051") as client:
        r = client.predict(atoms, electric_field=(0, 0, 0.05), outputs="all")
        r.energy, r.forces, r.polarization, r.born_charges, r.units

* :class:`Client` / :class:`AsyncClient`: ``predict``, ``predict_many``
  (PredictBatch, pipelined, optional progress bar), ``session()`` (one
  PredictStream kept open for MD), ``list_models``.
* :mod:`macefield_client.ase`: ``MACEFieldCalculator`` (needs ``ase``).
* ``macefield`` command line: ``macefield info``, ``macefield predict``.
* Errors: :class:`ServerUnavailable` (a ``ConnectionError`` naming the
  target, after retries), :class:`InvalidRequest` (a ``ValueError`` naming
  the bad field), :class:`RequestTimeout`, :class:`ResourceExhausted`,
  :class:`AuthenticationError` (token refused); :class:`ExtrapolationWarning`
  / :class:`ExtrapolationError` (the ASE calculator, a structure's
  extrapolation grade above :data:`EXTRAPOLATION_THRESHOLD`).
* TLS: ``Client(target, tls="ca.pem")`` or, for mutual TLS,
  ``tls=TLSConfig(ca="ca.pem", cert="client.pem", key="client.key")``;
  tokens: ``token="..."``.  Arguments not given come from the environment
  (``$MACEFIELD_SERVER``, ``$MACEFIELD_TOKEN``, ``$MACEFIELD_TLS_CA``,
  ``$MACEFIELD_TLS_CERT``, ``$MACEFIELD_TLS_KEY``, ``$MACEFIELD_TLS_SERVER_NAME``),
  the same in every interface.

Layout: :mod:`.contract` (the wire contract, shared with the server),
:mod:`.core` (channel, errors, results, the clients over one shared call
logic), :mod:`.md` (ASE, i-PI, LAMMPS, fields), :mod:`.data` (reference
structures), :mod:`.cli` (the commands).  The old module paths
(``macefield_client.ase``, ``.lammps``, ``.ipi``, ``.structures``, ...)
re-export their new homes.

The generated gRPC stubs live in :mod:`macefield_client.proto.macefield.v1`
(``macefield_pb2`` messages, ``macefield_pb2_grpc.MaceFieldStub``), generated
from ``proto/macefield/v1/*.proto`` by ``proto/generate_stubs.py``.
"""

__version__ = "0.1.0"

from .contract import EXTRAPOLATION_THRESHOLD, OUTPUTS, UNITS, ModelInfo, ServerInfo
from .core import (DEFAULT_TARGET, DEFAULT_TIMEOUT, AsyncClient, AsyncSession, AuthenticationError, Client,
                   ExtrapolationError, ExtrapolationWarning, FieldFromFileWarning, InvalidRequest, MACEFieldError,
                   RequestTimeout, ResourceExhausted, Result, RetryPolicy, ServerUnavailable, Session, TLSConfig)

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "EXTRAPOLATION_THRESHOLD", "OUTPUTS", "UNITS", "AsyncClient",
           "AsyncSession", "AuthenticationError", "Client", "ExtrapolationError", "ExtrapolationWarning",
           "FieldFromFileWarning", "InvalidRequest", "MACEFieldError", "ModelInfo", "RequestTimeout",
           "ResourceExhausted", "Result", "RetryPolicy", "ServerInfo", "ServerUnavailable", "Session", "TLSConfig"]
