"""``python -m ops.healthcheck PORT [TIMEOUT_S]``: exit 0 iff the gRPC server on PORT is SERVING.

Container health checks run this instead of a ``grpc_health_probe`` binary; it asks
``grpc.health.v1`` on 127.0.0.1, the same check ``recmesh up`` and ``status`` use, over
mTLS as ``RECMESH_TLS_IDENTITY`` (``ops`` by default; a container sets its own service's
name, whose certificate it has) with the files in ``RECMESH_TLS_DIR``, or in plaintext
with ``RECMESH_TLS=off``.
"""

from __future__ import annotations

import sys

from mesh.errors import ConfigError
from mesh.settings import ToolTlsSettings, load
from mesh.tls import Transport
from ops.supervisor import health_status

USAGE = "usage: python -m ops.healthcheck PORT [TIMEOUT_S]"


def main(argv: list[str] | None = None) -> int:
    """0 when SERVING, 1 otherwise (certificates missing included), 2 on bad arguments."""
    args = sys.argv[1:] if argv is None else argv
    try:
        port = int(args[0])
        timeout_s = float(args[1]) if len(args) > 1 else 1.0
    except (IndexError, ValueError):
        print(USAGE, file=sys.stderr)
        return 2
    if len(args) > 2 or not 0 < port < 65536 or timeout_s <= 0:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        transport = Transport.for_tool(load(ToolTlsSettings))
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    status = health_status(port, transport, timeout_s)
    print(f"127.0.0.1:{port} {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
