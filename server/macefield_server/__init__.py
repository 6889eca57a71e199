"""MACE-Field Serve: field-aware MACE potentials as a batched gRPC service."""

__version__ = "0.1.0"
