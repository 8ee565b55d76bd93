"""mTLS between processes and the identity rule, with real servers and real certificates.

The experiment service stands in for any service (it needs no Redis): it accepts a tenant
from the gateway and the tools (``ops``), not from ranking (``mesh.identity``).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from mesh.client import open_channel
from mesh.context import tenant_var
from mesh.errors import ConfigError, PermissionDenied, Unauthenticated
from mesh.identity import IDENTITIES, TENANT_CALLERS, rule_for
from mesh.pipe import PipeStub
from mesh.server import MeshServer
from mesh.settings import load
from mesh.testing import built_server, serving, tenant_metadata
from mesh.tls import PLAINTEXT, Credentials, Transport
from ops import certs
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

PROJECT = Path(__file__).resolve().parents[2]
BOOK = PROJECT / "config" / "experiments.json"
ASSIGN = experiment_pb2.AssignRequest(user_id="u1")


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    certs.ensure(directory)
    return directory


@pytest.fixture(scope="module")
async def experiment(tls_dir: Path) -> AsyncIterator[MeshServer]:
    settings = ExperimentSettings(
        port=0, experiments=BOOK, drain_delay_s=0.0, tls=True, tls_dir=tls_dir, health_port=0
    )
    server = await built_server(build_service, settings, plaintext=False)
    async with serving(server):
        yield server


def address(server: MeshServer) -> str:
    return f"127.0.0.1:{server.port}"


async def assign(
    server: MeshServer, transport: Transport, *, tenant: str | None = "demo"
) -> experiment_pb2.AssignResponse:
    metadata = tenant_metadata(tenant) if tenant else ()
    async with open_channel(address(server), transport, server="experiment") as channel:
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        reply: experiment_pb2.AssignResponse = await stub.Assign(
            ASSIGN, metadata=metadata, timeout=5
        )
        return reply


def as_identity(tls_dir: Path, identity: str) -> Transport:
    return Transport.load(True, tls_dir, identity)


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_the_gateway_names_a_tenant(experiment: MeshServer, tls_dir: Path) -> None:
    assert experiment.transport.secure
    reply = await assign(experiment, as_identity(tls_dir, "gateway"))
    assert reply.book_version


async def test_the_tools_identity_names_a_tenant(experiment: MeshServer, tls_dir: Path) -> None:
    assert (await assign(experiment, as_identity(tls_dir, "ops"))).book_version


async def test_another_services_certificate_naming_a_tenant_is_permission_denied(
    experiment: MeshServer, tls_dir: Path
) -> None:
    ranking = as_identity(tls_dir, "ranking")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(experiment, ranking)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'ranking' may not name tenant 'demo'" in str(caught.value.details())
    # Without a tenant it passes the rule (and the servicer asks for one).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(experiment, ranking, tenant=None)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Health needs no tenant: any identity the CA signed may ask.
    async with open_channel(address(experiment), ranking, server="experiment") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_pipe_holds_each_call_to_the_rule_by_the_streams_certificate(
    experiment: MeshServer, tls_dir: Path
) -> None:
    tenant_var.set("demo")
    for identity, allowed in (("gateway", True), ("ranking", False)):
        transport = as_identity(tls_dir, identity)
        async with open_channel(address(experiment), transport, server="experiment") as channel:
            stub = PipeStub(channel, "recmesh.experiment.v1.ExperimentService", "experiment")
            if allowed:
                assert (await stub.Assign(ASSIGN, timeout=5)).book_version
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Assign(ASSIGN, timeout=5)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "'ranking' may not name tenant 'demo'" in str(caught.value.details())
            await stub.close()


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    experiment: MeshServer, tls_dir: Path
) -> None:
    # TLS that trusts the CA but presents no certificate, and plaintext: no call gets through.
    no_cert = grpc.ssl_channel_credentials((tls_dir / "ca.crt").read_bytes())
    options = [("grpc.ssl_target_name_override", "experiment")]
    async with grpc.aio.secure_channel(address(experiment), no_cert, options=options) as channel:
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        call = stub.Assign(ASSIGN, metadata=tenant_metadata("demo"), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(experiment, PLAINTEXT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_is_refused(
    experiment: MeshServer, tmp_path: Path
) -> None:
    certs.ensure(tmp_path, ["gateway"])  # a CA of its own
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(experiment, as_identity(tmp_path, "gateway"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_tenant_without_a_verified_identity_is_unauthenticated(
    experiment: MeshServer, tls_dir: Path, tmp_path: Path
) -> None:
    # Signed by the mesh's CA, so the handshake passes, but it names no identity.
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert, key = certs.issue(ca, ca_key, None, datetime.datetime.now(datetime.UTC), common_name="x")
    anonymous = Transport(Credentials("anonymous", (tls_dir / "ca.crt").read_bytes(), cert, key))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(experiment, anonymous)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_client_checks_which_service_answers(
    experiment: MeshServer, tls_dir: Path
) -> None:
    gateway = as_identity(tls_dir, "gateway")
    async with open_channel(address(experiment), gateway, server="feature") as channel:
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        call = stub.Assign(ASSIGN, metadata=tenant_metadata("demo"), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAVAILABLE


async def test_the_health_port_is_plaintext_and_serves_only_health(
    experiment: MeshServer,
) -> None:
    assert experiment.health_port > 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{experiment.health_port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        call = stub.Assign(ASSIGN, metadata=tenant_metadata("demo"), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED


async def test_tls_off_is_plaintext_on_both_sides(tmp_path: Path) -> None:
    settings = load(ExperimentSettings, {"RECMESH_TLS": "off", "RECMESH_TLS_DIR": str(tmp_path)})
    assert not settings.tls
    server = await built_server(
        build_service,
        ExperimentSettings(port=0, experiments=BOOK, drain_delay_s=0.0, tls=settings.tls),
        plaintext=False,
    )
    async with serving(server):
        assert not server.transport.secure
        assert (await assign(server, PLAINTEXT, tenant="demo")).book_version


def test_tls_is_on_unless_turned_off_and_missing_files_are_named(tmp_path: Path) -> None:
    assert load(ExperimentSettings, {}).tls
    with pytest.raises(ConfigError, match=r"ca\.crt.*RECMESH_TLS=off"):
        Transport.load(True, tmp_path, "feature")
    certs.ensure(tmp_path, ["feature"])
    with pytest.raises(ConfigError, match=r"ranking\.crt"):
        Transport.load(True, tmp_path, "ranking")
    assert Transport.load(True, tmp_path, "feature").identity == "feature"
    (tmp_path / "feature.key").write_text("REPLACE-ME with the PEM private key")
    with pytest.raises(ConfigError, match=r"feature\.key holds no PEM"):
        Transport.load(True, tmp_path, "feature")
    assert Transport.load(False, tmp_path, "ranking").identity is None


def test_the_rule_table() -> None:
    # Every service of the mesh has a rule, and every identity named in one is issued.
    named = {caller for rule in TENANT_CALLERS.values() for caller in rule.callers}
    assert named <= set(IDENTITIES)
    assert set(TENANT_CALLERS) <= set(IDENTITIES)
    feature = rule_for("feature")
    for caller in ("gateway", "retrieval", "ranking", "ops"):
        feature.check("feature", caller, "demo")
    with pytest.raises(PermissionDenied):
        feature.check("feature", "projector", "demo")
    feature.check("feature", "projector", "")  # no tenant, no question
    with pytest.raises(Unauthenticated):
        feature.check("feature", None, "demo")
    # Quota acts for a tenant on every call (tenants travel in its messages).
    quota = rule_for("quota")
    quota.check("quota", "envoy", "")
    with pytest.raises(PermissionDenied):
        quota.check("quota", "feature", "")
    with pytest.raises(PermissionDenied):
        rule_for("gateway").check("gateway", "envoy", "demo")
    with pytest.raises(PermissionDenied):
        rule_for("no-such-service").check("no-such-service", "gateway", "demo")


def test_certificates_are_kept_while_good_and_issued_again_when_not(tmp_path: Path) -> None:
    first = certs.ensure(tmp_path, ["feature", "gateway"])
    assert first.new_ca and first.issued == ("feature", "gateway")
    before = (tmp_path / "feature.crt").read_bytes()
    again = certs.ensure(tmp_path, ["feature", "gateway"])
    assert not again.new_ca and again.issued == ()
    assert (tmp_path / "feature.crt").read_bytes() == before
    assert (tmp_path / "feature.key").stat().st_mode & 0o777 == 0o600
    # A missing certificate is issued alone.
    (tmp_path / "gateway.crt").unlink()
    assert certs.ensure(tmp_path, ["feature", "gateway"]).issued == ("gateway",)
    # A certificate another CA signed is replaced.
    other = tmp_path / "other"
    certs.ensure(other, ["gateway"])
    (tmp_path / "gateway.crt").write_bytes((other / "gateway.crt").read_bytes())
    (tmp_path / "gateway.key").write_bytes((other / "gateway.key").read_bytes())
    assert certs.ensure(tmp_path, ["feature", "gateway"]).issued == ("gateway",)
    # One expiring within the renewal window is issued again, by the same CA.
    soon = datetime.datetime.now(datetime.UTC) + certs.CERT_VALID - certs.RENEW_BEFORE / 2
    later = certs.ensure(tmp_path, ["feature", "gateway"], clock=lambda: soon)
    assert not later.new_ca and later.issued == ("feature", "gateway")
    # A new CA re-issues everything.
    (tmp_path / "ca.key").unlink()
    renewed = certs.ensure(tmp_path, ["feature", "gateway"])
    assert renewed.new_ca and renewed.issued == ("feature", "gateway")
