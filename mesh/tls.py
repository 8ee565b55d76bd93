"""How a process speaks gRPC: mutual TLS with its own identity, or plaintext when asked.

Every process of the mesh has an identity, its name (``feature``, ``gateway``...; a tool
presents ``ops``), carried by a certificate that the mesh's CA signed: a SAN URI
``spiffe://recmesh/<name>``, and the DNS name ``<name>``. The files live in one directory
(``RECMESH_TLS_DIR``, ``var/tls`` by default, issued by :mod:`ops.certs`)::

    ca.crt                    the CA every process trusts, and only it
    <name>.crt  <name>.key    one process's certificate and key

With TLS on (``RECMESH_TLS``, the default) a server requires a client certificate the CA
signed (a client without one fails the handshake: the client sees ``UNAVAILABLE``), and a
client checks that the server's certificate names the service it meant to reach. What a
verified caller may do is :mod:`mesh.identity`'s rule. ``RECMESH_TLS=off`` makes both sides
plaintext, for local debugging only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mesh.errors import ConfigError
from mesh.settings import ServerSettings, ToolTlsSettings

SPIFFE_PREFIX = "spiffe://recmesh/"
"""The SAN URI of an identity is this prefix and its name."""

CA_FILE = "ca.crt"

ChannelOptions = Sequence[tuple[str, Any]]


def spiffe_id(identity: str) -> str:
    """The SAN URI a certificate of ``identity`` carries."""
    return f"{SPIFFE_PREFIX}{identity}"


def cert_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}.crt"


def key_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}.key"


@dataclass(frozen=True)
class Credentials:
    """One identity's PEM material and the CA it trusts."""

    identity: str
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, identity: str) -> Credentials:
        """The CA, certificate and key of ``identity`` from ``directory``.

        Raises:
            ConfigError: a file is missing, unreadable or not PEM (the message names it and
                says how to issue the set or turn TLS off).
        """
        paths = (directory / CA_FILE, cert_file(directory, identity), key_file(directory, identity))
        contents = []
        for path in paths:
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(
                    f"TLS is on (RECMESH_TLS) but {path} cannot be read ({exc.strerror}): "
                    f"issue the certificates with `recmesh certs` (or `python -m ops.certs "
                    f"--dir {directory}`), point RECMESH_TLS_DIR at them, or set RECMESH_TLS=off "
                    f"for local debugging"
                ) from exc
        for path, content in zip(paths, contents, strict=True):
            if b"-----BEGIN " not in content:
                raise ConfigError(f"TLS is on (RECMESH_TLS) but {path} holds no PEM data")
        ca, cert, key = contents
        return cls(identity, ca, cert, key)


class Transport:
    """A process's side of every gRPC connection it opens or accepts.

    Build one with :meth:`of` (a service, from its settings) or :meth:`for_tool`, and use it
    for every server port and every channel of the process.
    """

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self._channel: grpc.ChannelCredentials | None = None
        if credentials is not None:
            self._channel = grpc.ssl_channel_credentials(
                credentials.ca, credentials.key, credentials.cert
            )

    @classmethod
    def plaintext(cls) -> Transport:
        """No TLS at all: for ``RECMESH_TLS=off`` and in-process tests."""
        return cls(None)

    @classmethod
    def load(cls, enabled: bool, directory: Path, identity: str) -> Transport:
        """mTLS as ``identity`` with the files in ``directory`` when ``enabled``, else plaintext.

        Raises:
            ConfigError: TLS is on and a file is missing.
        """
        return cls(Credentials.load(directory, identity) if enabled else None)

    @classmethod
    def of(cls, settings: ServerSettings) -> Transport:
        """The transport of the service ``settings`` configure: its identity is its name."""
        return cls.load(settings.tls, settings.tls_dir, settings.service_name)

    @classmethod
    def for_tool(cls, settings: ToolTlsSettings) -> Transport:
        """The transport of a tool (``RECMESH_TLS_IDENTITY``, ``ops`` by default)."""
        return cls.load(settings.tls, settings.tls_dir, settings.tls_identity)

    @property
    def secure(self) -> bool:
        return self.credentials is not None

    @property
    def identity(self) -> str | None:
        """The name this process presents, None in plaintext."""
        return None if self.credentials is None else self.credentials.identity

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: this identity's certificate; clients must present one the CA signed.

        Raises:
            ValueError: the transport is plaintext.
        """
        if self.credentials is None:
            raise ValueError("a plaintext transport has no server credentials")
        return grpc.ssl_server_credentials(
            [(self.credentials.key, self.credentials.cert)],
            root_certificates=self.credentials.ca,
            require_client_auth=True,
        )

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``address`` on ``server`` (mTLS or plaintext); the bound port, 0 on failure."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.server_credentials())

    def _options(self, server: str | None, options: ChannelOptions) -> list[tuple[str, Any]]:
        merged = list(options)
        if self._channel is not None and server is not None:
            # Verify the server's certificate against the service meant, not the address.
            merged.append(("grpc.ssl_target_name_override", server))
        return merged

    def channel(
        self,
        target: str,
        *,
        server: str | None = None,
        options: ChannelOptions = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``target``; with TLS, the server's certificate must name
        ``server`` (a service name), or the target's host when ``server`` is None."""
        opts = self._options(server, options)
        if self._channel is None:
            return grpc.aio.insecure_channel(
                target, options=opts, interceptors=list(interceptors) or None
            )
        return grpc.aio.secure_channel(
            target, self._channel, options=opts, interceptors=list(interceptors) or None
        )

    def sync_channel(
        self, target: str, *, server: str | None = None, options: ChannelOptions = ()
    ) -> grpc.Channel:
        """A blocking channel to ``target`` (tools), as :meth:`channel`."""
        opts = self._options(server, options)
        if self._channel is None:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, self._channel, options=opts)


PLAINTEXT = Transport.plaintext()
"""The plaintext transport (in-process tests, ``RECMESH_TLS=off``)."""


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The identity of the verified certificate the caller presented, None without one (a
    plaintext connection, or a certificate without a ``spiffe://recmesh/`` SAN URI)."""
    values = context.auth_context().get("peer_spiffe_id") or ()
    for raw in values:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if text.startswith(SPIFFE_PREFIX) and len(text) > len(SPIFFE_PREFIX):
            return text[len(SPIFFE_PREFIX) :]
    return None
