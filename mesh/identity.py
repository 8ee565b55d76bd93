"""Who may act for a tenant: the one table of which callers may name a tenant to which service.

A call names its tenant in the ``x-recmesh-tenant`` metadata (:mod:`mesh.context`); the
quota service also takes tenants in its request messages (``AcquireRequest.tenant``,
Envoy's rate-limit descriptors). With TLS on, every served call's handling
(:mod:`mesh.handling`, unary or piped) lets it through only when the caller's certificate identity
(:func:`mesh.tls.peer_identity`) is in the serving service's list below:

- a call that names no tenant is served for any caller the CA vouched for (health checks,
  reflection, monitoring), except by the quota service, whose every call acts for a tenant;
- a call that names a tenant from an identity not in the list is ``PERMISSION_DENIED``;
- a call that names a tenant without a verified identity is ``UNAUTHENTICATED``.

In plaintext (``RECMESH_TLS=off``) nothing is checked: there is no identity to check.

The lists are the code's call graph, each edge with a tenant:

====================  ==========================================================
service               callers that may name a tenant
====================  ==========================================================
feature               gateway (catalog widths), retrieval and ranking (user and
                      item features, trending, item changes and counters), ops
events                gateway (impressions, exposures, events, reports' reads,
                      erasure by an admin API key),
                      feature (as-of reads of the log), ops
retrieval, ranking    gateway, ops (``recmesh versions`` asks what is served)
experiment            gateway, ops (``recmesh experiments report``)
quota                 gateway (admissions, costs), envoy (Envoy's rate-limit
                      filter), ops (``recmesh usage``); every call
gateway, projector    nobody: the gateway's tenant comes from the API key; the
                      projector serves no API
====================  ==========================================================

``ops`` is the identity of the tools (``recmesh``, the chaos suite, ``training
simulate``, the materialisation job); ``envoy`` is an Envoy in front of the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import PermissionDenied, Unauthenticated
from mesh.ports import SERVICES

GATEWAY = "gateway"
ENVOY = "envoy"
OPS = "ops"
"""The identity the tools present."""


@dataclass(frozen=True)
class TenantRule:
    """Which callers may name a tenant to one service.

    Attributes:
        callers: identities that may name a tenant.
        every_call: every call acts for a tenant (tenants also travel in the messages),
            so every call, named tenant or not, must come from ``callers``.
    """

    callers: frozenset[str]
    every_call: bool = False

    def check(self, service: str, caller: str | None, tenant: str) -> None:
        """Allow a call to ``service`` from ``caller`` (None: no verified identity) that
        names ``tenant`` (empty: none).

        Raises:
            Unauthenticated: a tenant without a verified caller identity.
            PermissionDenied: a caller not allowed to act for a tenant here.
        """
        if not tenant and not self.every_call:
            return
        if caller is None:
            raise Unauthenticated(
                f"{service}: a call for a tenant needs a verified client certificate"
            )
        if caller not in self.callers:
            what = f"name tenant {tenant!r}" if tenant else "call"
            raise PermissionDenied(f"{service}: identity {caller!r} may not {what} here")


NOBODY = TenantRule(frozenset())

TENANT_CALLERS: Mapping[str, TenantRule] = {
    "feature": TenantRule(frozenset({GATEWAY, "retrieval", "ranking", OPS})),
    "events": TenantRule(frozenset({GATEWAY, "feature", OPS})),
    "retrieval": TenantRule(frozenset({GATEWAY, OPS})),
    "ranking": TenantRule(frozenset({GATEWAY, OPS})),
    "experiment": TenantRule(frozenset({GATEWAY, OPS})),
    "quota": TenantRule(frozenset({GATEWAY, ENVOY, OPS}), every_call=True),
    "gateway": NOBODY,
    "projector": NOBODY,
}
"""Service name -> who may act for a tenant there (the module docstring says why)."""

IDENTITIES: tuple[str, ...] = (*SERVICES, GATEWAY, ENVOY, OPS)
"""Every identity the mesh's CA issues a certificate to (``ops.certs``)."""


def rule_for(service: str) -> TenantRule:
    """``service``'s rule; a service missing from the table lets nobody name a tenant."""
    return TENANT_CALLERS.get(service, NOBODY)
