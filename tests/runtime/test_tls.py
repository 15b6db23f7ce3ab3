"""TLS and mTLS on a real server, with certificates made in the test."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cabincrew.clients import AuditClient, ChannelOptions, RPCError, open_channel
from cabincrew.runtime.context import current_principal
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.runtime.server import create_server
from cabincrew.v1 import audit_pb2, audit_pb2_grpc
from tests.conftest import make_config, token_for


def _cert(
    name: str,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer: x509.Name | None,
    ca: bool,
    path: Path,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    (path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, subject


class _WhoAmI(audit_pb2_grpc.AuditServiceServicer):
    async def VerifyLog(self, request: object, context: object) -> audit_pb2.VerifyLogResponse:
        principal = current_principal()
        return audit_pb2.VerifyLogResponse(
            reason=f"{principal.name}|{','.join(sorted(principal.roles))}"
        )


async def _build(context: object) -> GrpcServiceHandle:
    return GrpcServiceHandle(
        "audit",
        "cabincrew.v1.AuditService",
        _WhoAmI(),
        audit_pb2_grpc.add_AuditServiceServicer_to_server,
    )


async def test_an_mtls_client_certificate_becomes_a_principal_with_mapped_roles(
    tmp_path: Path,
) -> None:
    ca_key, ca_name = _cert("ca", None, None, True, tmp_path)
    _cert("localhost", ca_key, ca_name, False, tmp_path)
    _cert("orchestrator-1", ca_key, ca_name, False, tmp_path)
    config = make_config(
        tmp_path / "data",
        services=("audit",),
        **{
            "server.addr": "localhost:0",
            "server.tls": {
                "cert_file": str(tmp_path / "localhost.crt"),
                "key_file": str(tmp_path / "localhost.key"),
                "client_ca_file": str(tmp_path / "ca.crt"),
                "require_client_auth": True,
            },
            "auth.mtls_roles": {"orchestrator-1": ["service"]},
        },
    )
    app, port = await create_server(config, {"audit": _build})  # type: ignore[dict-item]
    await app.start()
    try:
        good = AuditClient(
            open_channel(
                ChannelOptions(
                    address=f"localhost:{port}",
                    tls_ca_file=str(tmp_path / "ca.crt"),
                    client_cert_file=str(tmp_path / "orchestrator-1.crt"),
                    client_key_file=str(tmp_path / "orchestrator-1.key"),
                )
            )
        )
        try:
            response = await good.verify_log(timeout=10)
        finally:
            await good.aclose()
        assert response.reason == "orchestrator-1|service"

        anonymous = AuditClient(
            open_channel(
                ChannelOptions(address=f"localhost:{port}", tls_ca_file=str(tmp_path / "ca.crt"))
            ),
            max_attempts=1,
        )
        try:
            with pytest.raises(RPCError) as info:
                await anonymous.verify_log(timeout=5)
        finally:
            await anonymous.aclose()
        # The handshake itself fails without a client certificate.
        assert info.value.status in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}
    finally:
        await app.stop(0)


async def test_server_tls_carries_bearer_tokens_and_refuses_plaintext(tmp_path: Path) -> None:
    ca_key, ca_name = _cert("ca", None, None, True, tmp_path)
    _cert("localhost", ca_key, ca_name, False, tmp_path)
    config = make_config(
        tmp_path / "data",
        services=("audit",),
        **{
            "server.addr": "localhost:0",
            "server.tls": {
                "cert_file": str(tmp_path / "localhost.crt"),
                "key_file": str(tmp_path / "localhost.key"),
            },
        },
    )
    app, port = await create_server(config, {"audit": _build})  # type: ignore[dict-item]
    await app.start()
    token = token_for(config, "alice", ["auditor"])
    try:
        over_tls = AuditClient(
            open_channel(
                ChannelOptions(
                    address=f"localhost:{port}", token=token, tls_ca_file=str(tmp_path / "ca.crt")
                )
            )
        )
        try:
            response = await over_tls.verify_log(timeout=10)
        finally:
            await over_tls.aclose()
        assert response.reason == "alice|auditor"

        plaintext = AuditClient(
            open_channel(ChannelOptions(address=f"localhost:{port}", token=token)), max_attempts=1
        )
        try:
            with pytest.raises(RPCError) as info:
                await plaintext.verify_log(timeout=5)
        finally:
            await plaintext.aclose()
        assert info.value.status is grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop(0)
