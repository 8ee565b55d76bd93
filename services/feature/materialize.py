"""Batch materialisation: load the synthetic world's features from the live artifact set."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.artifacts import load_artifact_set, resolve_current
from mesh.errors import FailedPrecondition
from services.feature.store import FeatureStore, ViewInfo

log = logging.getLogger(__name__)

BATCH = 2000


@dataclass(frozen=True)
class MaterializeResult:
    version: str
    users: int
    items: int
    loaded: bool


class Materializer:
    """Writes the artifact set under ``root/current`` into a tenant's feature views.

    One tenant is loaded at a time; a second request for the same tenant waits for
    the first and then finds the version already loaded. A version's file hashes are
    checked before its first load in this process (``ArtifactError`` naming the file),
    not again for the next tenants, and not when the tenant already has that version.
    """

    def __init__(self, store: FeatureStore, root: Path) -> None:
        self._store = store
        self._root = root
        self._lock = asyncio.Lock()
        self._verified: set[Path] = set()

    async def require_info(self, tenant: str) -> ViewInfo:
        """The tenant's views.

        Raises:
            FailedPrecondition: nothing is materialised for the tenant yet.
        """
        info = await self._store.info(tenant)
        if info is None:
            raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
        return info

    async def materialize(self, tenant: str, force: bool = False) -> MaterializeResult:
        """Load users, histories and items of the current artifact set for ``tenant``."""
        async with self._lock:
            path = resolve_current(self._root).resolve()
            artifacts = load_artifact_set(path, verify=False)
            current = await self._store.info(tenant)
            if current is not None and current.version == artifacts.version and not force:
                return MaterializeResult(current.version, current.users, current.items, False)
            if path not in self._verified:
                # Hashing a 1M-item set reads ~600 MB: once per version, off the loop.
                await asyncio.to_thread(load_artifact_set, path)
                self._verified.add(path)
            users = np.load(artifacts.file("user_features"), mmap_mode="r")
            items = np.load(artifacts.file("item_features"), mmap_mode="r")
            categories = np.load(artifacts.file("item_categories"))
            history = np.load(artifacts.file("user_history"))
            indptr, history_items = history["indptr"], history["items"]
            await self._store.set_views(
                tenant,
                version=artifacts.version,
                user_default=np.asarray(users.mean(axis=0), dtype=np.float32),
                item_default=np.asarray(items.mean(axis=0), dtype=np.float32),
                users=users.shape[0],
                items=items.shape[0],
            )
            for start in range(0, users.shape[0], BATCH):
                stop = min(start + BATCH, users.shape[0])
                await self._store.write_users(
                    tenant,
                    [f"u{r}" for r in range(start, stop)],
                    np.asarray(users[start:stop], dtype=np.float32),
                    [history_items[indptr[r] : indptr[r + 1]].tolist() for r in range(start, stop)],
                )
            await self._store.load_items(tenant, items, categories)
            log.info(
                "materialized",
                extra={"fields": {"version": artifacts.version, "users": users.shape[0]}},
            )
            return MaterializeResult(artifacts.version, users.shape[0], items.shape[0], True)
