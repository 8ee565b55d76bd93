"""The Redis key schema of a tenant's data, in one place.

Every key carries the tenant as a hash tag, ``rm:{<tenant>}:...``, so in Redis Cluster a
tenant's keys share one slot: a Lua script or ``MGET`` over them stays one round trip,
and tenants never share a key. The feature store, the event log and the projector all
name keys through these functions (the quota service keeps its own ``rm:{tenant:<t>}``
buckets, which the gateway never reads).
"""

from __future__ import annotations


def tenant_prefix(tenant: str) -> str:
    """``rm:{<tenant>}:``, the start of every key of ``tenant``."""
    return f"rm:{{{tenant}}}:"


def projection_prefix(tenant: str, namespace: str = "") -> str:
    """The start of the projector's keys of ``tenant``: the live ones (``namespace`` empty,
    ``rm:{<tenant>}:``) or those of a rebuild (``rm:{<tenant>}:ns:<namespace>:``). A
    namespace keeps the tenant's hash tag, so a rebuild's keys share the live ones' slot."""
    base = tenant_prefix(tenant)
    return f"{base}ns:{namespace}:" if namespace else base


def meta(tenant: str) -> str:
    """Hash: the feature views' widths, defaults and source version."""
    return f"{tenant_prefix(tenant)}meta"


def user_row(tenant: str, user_id: str) -> str:
    """Packed float32 user feature row."""
    return f"{tenant_prefix(tenant)}u:{user_id}"


def history(tenant: str, user_id: str) -> str:
    """List of the user's item ids from the materialised artifact set (decimal), most
    recent last; replaced when a set is materialised."""
    return f"{tenant_prefix(tenant)}h:{user_id}"


def outcomes(tenant: str, user_id: str, namespace: str = "") -> str:
    """List: the user's clicks and conversions projected from the event log (item ids,
    decimal, newest last). Kept apart from :func:`history`, which materialisation
    replaces; the feature store serves the two together."""
    return f"{projection_prefix(tenant, namespace)}o:{user_id}"


def category_shares(tenant: str, user_id: str, namespace: str = "") -> str:
    """Hash: the user's clicks and conversions counted by the item's category (field: the
    category, decimal); a user's share of a category is its count over the sum."""
    return f"{projection_prefix(tenant, namespace)}uc:{user_id}"


def item_row(tenant: str, item_id: int) -> str:
    """Packed float32 item feature row plus its int32 category."""
    return f"{tenant_prefix(tenant)}i:{item_id}"


def item_changes(tenant: str) -> str:
    """Sorted set: items whose rows were written one by one (``WriteItemFeatures``, the
    catalog's upserts) or that were withdrawn (the catalog's deletes), scored by the
    change's epoch ms (not the bulk load of a whole set)."""
    return f"{tenant_prefix(tenant)}ichg"


def item_ids(tenant: str) -> str:
    """Hash: the tenant's own item ids (``core.catalog``) to their internal ids (decimal)."""
    return f"{tenant_prefix(tenant)}cat:ids"


def item_names(tenant: str) -> str:
    """Hash: internal ids (decimal) of the tenant's own items to their external ids."""
    return f"{tenant_prefix(tenant)}cat:names"


def item_next(tenant: str) -> str:
    """Counter: internal ids handed out in the tenant's own range (``LIVE_BASE`` + it)."""
    return f"{tenant_prefix(tenant)}cat:next"


def withdrawn(tenant: str) -> str:
    """Set: internal ids (decimal) of items never to be served: deleted, or upserted as
    not available."""
    return f"{tenant_prefix(tenant)}cat:off"


def events(tenant: str) -> str:
    """Stream: the tenant's event log (field ``e`` = a serialized ``Event``)."""
    return f"{tenant_prefix(tenant)}events"


def catalog_events(tenant: str) -> str:
    """Stream: a copy of the tenant's catalog events (``item_upsert``, ``item_delete``),
    written with their append to :func:`events` and capped in length. The projector reads it
    ahead of the log, so catalog changes never queue behind impressions; the log stays the
    source of truth (a copy trimmed unread is applied from the log)."""
    return f"{tenant_prefix(tenant)}events:cat"


def event_claim(tenant: str, event_id: str) -> str:
    """Dedupe claim of an appended event id."""
    return f"{tenant_prefix(tenant)}eid:{event_id}"


def request_events(tenant: str, request_id: str) -> str:
    """List of the stream positions of the events that name ``request_id``."""
    return f"{tenant_prefix(tenant)}rq:{request_id}"


def user_events(tenant: str, user_id: str) -> str:
    """Sorted set: the stream positions of the user's events (member: the position; score:
    its append time, ms), written with the append; as-of reads and erasure use it."""
    return f"{tenant_prefix(tenant)}ue:{user_id}"


def dead_letters(tenant: str) -> str:
    """Stream: events the projector could not apply, with the reason."""
    return f"{tenant_prefix(tenant)}events:dead"


def applied(tenant: str, event_id: str, namespace: str = "") -> str:
    """The projector's mark that ``event_id`` was applied to the projections."""
    return f"{projection_prefix(tenant, namespace)}pj:{event_id}"


def item_counters(tenant: str, item_id: int | str, namespace: str = "") -> str:
    """Hash: the item's exponentially decayed impression, click and conversion counts
    (``item_id`` "" names the prefix every item's key starts with)."""
    return f"{projection_prefix(tenant, namespace)}ic:{item_id}"


def trending(tenant: str, namespace: str = "") -> str:
    """Sorted set: items by their decayed click count (member: item id, decimal; score:
    ``core.replay.trending_score``, comparable across items at any time)."""
    return f"{projection_prefix(tenant, namespace)}tr"


def snapshot(tenant: str) -> str:
    """Hash: the tenant's projections as of a log position (``position``, ``taken_ms``,
    ``state``: ``core.replay.Projected`` as compressed JSON), which a rebuild starts from
    and before which retention may trim the log."""
    return f"{tenant_prefix(tenant)}snap"


def retention_lock(tenant: str) -> str:
    """The lock a projector replica holds while it trims the tenant's log."""
    return f"{tenant_prefix(tenant)}snap:lock"


def audit(tenant: str) -> str:
    """Stream: the tenant's audit records (erasures: who, when, what, how many)."""
    return f"{tenant_prefix(tenant)}audit"
