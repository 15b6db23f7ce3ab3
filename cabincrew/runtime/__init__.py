"""Service runtime: server bootstrap, health, reflection, TLS, auth and shutdown."""

from cabincrew.runtime.context import (
    ServiceContext,
    ServiceHandle,
    current_principal,
    current_request_id,
)
from cabincrew.runtime.server import CabinCrewServer, create_server, serve

__all__ = [
    "CabinCrewServer",
    "ServiceContext",
    "ServiceHandle",
    "create_server",
    "current_principal",
    "current_request_id",
    "serve",
]
