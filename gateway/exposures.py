"""Exposure and error events: what an experiment report needs from the gateway besides
the impressions.

**Exposure.** A request is exposed to experiment E's variant V when

1. the experiment service bucketed the user into V (its answer, fresh or from the
   gateway's cache; the control variants the gateway applies while that service is down are
   not a bucketing and expose no one), and
2. V's params were applied to the request, judged over every knob that *any* variant of
   E sets (from the book): each holds V's value in the merged params of the request's
   assignments, and a knob V leaves at its default is set by no other experiment either.
   A later experiment overriding one of E's knobs thus unexposes the request whichever
   variant of E it is in, control included: judging only V's own params would keep E's
   control users whose answer another experiment changed and drop its treatment users in
   the same situation, and compare two different populations.

Both are known once admission is over, before retrieval: exposure is decided before
anything the variant can influence, the same way for every variant. Control users are
exposed exactly like treatment users: their answer is the one computed with the control's
params, i.e. the answer a treatment user would have had without the treatment, so
"changed the response" means "the response is the one of the assigned variant" and not
"differs from the default" (which would expose only treatment users, or only those the
treatment happened to change, and select each arm by its outcome). A request that then
fails is still exposed (its error is counted against its variant).

Exposures are deduplicated per user, experiment, variant and UTC day by their event id
(:func:`exposure_id`: no tenant in it, the log being the tenant's), so the events service
stores the first of the day and drops the repeats within its dedupe window (8 days). The
gateway also remembers the ids it sent (:class:`ExposureMemo`) and does not send them again,
which keeps the repeats off the wire.

**Error.** A request of a user with assignments that the gateway fails after admission
(e.g. retrieval down with no fallback cached: a 503) gets one ``error`` event
(``<request_id>:error``) with the request's variants, degraded stages, the failure's status
name (``attributes["code"]``) and its latency; a report counts them per variant.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2

from core.experiments.book import ExperimentBook


def utc_day(ts_ms: int) -> str:
    """The UTC day of a time in ms since the epoch, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%d")


def exposure_id(user_id: str, experiment_key: str, variant_key: str, ts_ms: int) -> str:
    """The event id of the user's exposure to the variant on the UTC day of ``ts_ms``:
    ``x:`` and 40 hex digits of the SHA-256 of the four, separated by U+001F. The same for
    every request of that user, variant and day, in any gateway process."""
    text = "\x1f".join((user_id, experiment_key, variant_key, utc_day(ts_ms)))
    return "x:" + hashlib.sha256(text.encode()).hexdigest()[:40]


def experiment_knobs(book: ExperimentBook) -> dict[str, frozenset[str]]:
    """Experiment key -> every knob any of its variants sets."""
    return {
        experiment.key: frozenset(k for variant in experiment.variants for k in variant.params)
        for experiment in book.experiments
    }


def applied(
    assignments: Sequence[experiment_pb2.Assignment],
    merged: Mapping[str, str],
    knobs: Mapping[str, frozenset[str]],
) -> list[experiment_pb2.Assignment]:
    """The assignments whose experiment's every knob (``knobs``, by experiment key; only
    the assignment's own params for an experiment the gateway's book does not know) holds
    the assigned variant's value in ``merged``, or no value where the variant sets none
    (see the module docstring, point 2)."""
    return [
        a
        for a in assignments
        if all(
            merged.get(k) == a.params.get(k)
            for k in knobs.get(a.experiment_key, frozenset()) | set(a.params)
        )
    ]


class ExposureMemo:
    """The exposure ids this gateway already queued, per tenant, at most ``max_entries``
    (the least recently seen is forgotten first; ``max_entries <= 0`` remembers none, so
    every request sends its exposures and the events service drops the repeats)."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def first(self, tenant: str, event_id: str) -> bool:
        """Whether ``event_id`` of ``tenant`` is new to the memo (it is remembered from now)."""
        if self._max_entries <= 0:
            return True
        key = (tenant, event_id)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
        return True


def exposures(
    memo: ExposureMemo,
    tenant: str,
    user_id: str,
    request_id: str,
    assignments: Sequence[experiment_pb2.Assignment],
    book_version: str,
    now_ms: int,
) -> list[events_pb2.Event]:
    """The exposure events of one request not sent yet: one per assignment in
    ``assignments`` (the applied bucketings), each naming only its own experiment in
    ``variants`` and the book's version."""
    events = []
    for assignment in assignments:
        key, variant = assignment.experiment_key, assignment.variant_key
        event_id = exposure_id(user_id, key, variant, now_ms)
        if memo.first(tenant, event_id):
            events.append(
                events_pb2.Event(
                    event_id=event_id,
                    type="exposure",
                    user_id=user_id,
                    request_id=request_id,
                    ts_ms=now_ms,
                    variants={key: variant},
                    book_version=book_version,
                )
            )
    return events


def error_event(
    user_id: str,
    request_id: str,
    variants: Mapping[str, str],
    degraded: Sequence[str],
    code: str,
    latency_ms: float,
    now_ms: int,
) -> events_pb2.Event:
    """The ``error`` event of a request the gateway failed (see the module docstring)."""
    return events_pb2.Event(
        event_id=f"{request_id}:error",
        type="error",
        user_id=user_id,
        request_id=request_id,
        ts_ms=now_ms,
        variants=dict(variants),
        degraded=list(degraded),
        attributes={"code": code},
        latency_ms=latency_ms,
    )
