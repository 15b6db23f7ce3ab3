"""CabinCrew: governed AI automation, the CabinCrew protocol as gRPC services."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1"
