"""Data for examples, tests and benchmarks: reference structures (:mod:`.structures`, needs ``ase``) and, from
the wire contract, reference labels in data files (:mod:`macefield_client.contract.labels`) and errors against
them (:mod:`macefield_client.contract.accuracy`), re-exported here as ``labels`` and ``accuracy``."""

from ..contract import accuracy, labels

__all__ = ["accuracy", "labels"]
