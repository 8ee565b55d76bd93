"""An experiment's report from its tenant's event log: a columnar table of the log, kept up
to date incrementally, and the report computed from it with numpy and
:mod:`core.experiments.stats`.

**The table** (:class:`LogTable`) holds, per tenant, what any report needs from each event
(one pass, in log order, each entry once): impressions (user, request, item, the request's
variants, whether it fell back, its latency, day, log index), clicks and conversions
(request, item, log index), exposures (user, experiment and variant, book version, log
index) and errors. Strings are interned to integers; the rows are typed arrays. A later
report reads only the entries appended since (:func:`refresh`); the table is rebuilt from
the start of the log when the tenant's audit stream grew (an erasure removed entries) or
the log's first entry changed (retention trimmed it).

**The report** (:func:`compute`) of experiment E, with its variants ``V0`` (control), ``V1``…:

* A user's variant is the one their exposures to E name. A user exposed to several (a book
  change moved them) is left out of every figure and counted in ``data_quality``; so are
  exposures naming a variant the book no longer has.
* A variant's impressions are those of requests assigned to it (``variants[E]``, the
  gateway's control fallback excluded: it is not a bucketing) of the users exposed to it
  alone. Clicks and conversions join to them by ``(request_id, item_id)``; an impression
  counts as clicked (converted) when at least one click (conversion) names it, wherever it
  is in the log.
* Users per variant are its exposed users, those without an impression included; CTR and
  conversion rate are ratio metrics over their per-user sums (``stats.compare_ratio``: delta
  method, user as the unit), each treatment against the control.
* CUPED: the covariate of a user is their CTR (conversion rate) over the log **before the
  experiment's first exposure** (entries before it in log order: impressions appended
  before it, joined to the clicks and conversions also appended before it: what the log
  held then, as the as-of reads define it); a user without an impression then gets the
  pooled pre-experiment value of the compared users. No CUPED when no compared user has one.
* SRM: ``stats.sample_ratio`` of the users per variant against the book's weights.
* Guardrails per variant: ``degraded_share`` = requests answered with a non-empty
  ``degraded`` / requests answered; ``p99_latency_ms`` = 99th percentile (numpy's linear
  interpolation) of the gateway's ``latency_ms`` over those requests and the failed ones
  (zeros, not measured, left out); ``error_rate`` = failed requests (``error`` events) /
  (answered + failed). Each passes while its value is at most the book's bound.
* Spread: coverage and Gini (``stats.coverage``, ``stats.gini`` over every catalogue item,
  zeros included) of each variant's impressions, overall and per UTC day.
"""

from __future__ import annotations

import gc
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import numpy as np
import numpy.typing as npt
from recmesh.experiment.v1 import experiment_pb2

from core import keys
from core.experiments import stats
from core.experiments.book import Experiment
from core.logread import iter_log
from core.replay import Stored, appended_ms
from mesh.redis import AsyncRedis

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

DAY_MS = 86_400_000
FALLBACK = -4
"""``variants`` of a request answered with the gateway's control fallback."""
UNKNOWN = -2
"""A variant the book does not have."""
SEVERAL = -3
"""A user exposed to more than one variant."""
ABSENT = -1
"""Not in the experiment."""


@dataclass(frozen=True)
class ReportSpec:
    """What a report needs from the book: the experiment's variants and weights, its
    guardrails and the book's version (plain values, so it can cross to a worker process).
    """

    key: str
    variants: tuple[tuple[str, float], ...]
    guardrails: tuple[tuple[str, float], ...]
    book_version: str
    alpha: float = 0.05

    @classmethod
    def of(cls, experiment: Experiment, book_version: str) -> ReportSpec:
        """The spec of ``experiment`` of the book of version ``book_version``."""
        return cls(
            key=experiment.key,
            variants=tuple((v.key, v.weight) for v in experiment.variants),
            guardrails=tuple(experiment.guardrails.bounds()),
            book_version=book_version,
        )


class _Rows:
    """Typed columns of one kind of event, appended to row by row."""

    def __init__(self, ints: Sequence[str], floats: Sequence[str] = ()) -> None:
        self.ints = {name: array("q") for name in ints}
        self.floats = {name: array("d") for name in floats}

    def __len__(self) -> int:
        return len(next(iter(self.ints.values())))

    def column(self, name: str) -> I64:
        """A copy of the integer column ``name``."""
        return np.frombuffer(self.ints[name], dtype=np.int64).copy()

    def reals(self, name: str) -> F64:
        """A copy of the float column ``name``."""
        return np.frombuffer(self.floats[name], dtype=np.float64).copy()


@dataclass
class LogTable:
    """A tenant's log as columns (module docstring); :meth:`extend` appends entries."""

    position: str = ""
    """The last position read ("" before the first)."""
    first_position: str = ""
    """The position of the first entry read: when the log's first entry is another one, it
    was trimmed and the table is rebuilt."""
    audit_length: int = 0
    """Length of the tenant's audit stream when the table was (re)started."""
    entries: int = 0
    invalid: int = 0
    users: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    signatures: dict[tuple[tuple[tuple[str, str], ...], bool], int] = field(default_factory=dict)
    """(the request's sorted variants, answered with the control fallback) -> id."""
    arms: dict[tuple[str, str], int] = field(default_factory=dict)
    """(experiment, variant) of exposures -> id."""
    versions: dict[str, int] = field(default_factory=dict)
    impressions: _Rows = field(
        default_factory=lambda: _Rows(
            ("user", "request", "item", "signature", "degraded", "day", "index"), ("latency",)
        )
    )
    outcomes: _Rows = field(
        default_factory=lambda: _Rows(("conversion", "request", "item", "index"))
    )
    exposures: _Rows = field(
        default_factory=lambda: _Rows(("user", "arm", "version", "index", "at"))
    )
    errors: _Rows = field(
        default_factory=lambda: _Rows(("user", "signature", "index"), ("latency",))
    )

    def _intern(self, table: dict[str, int], text: str) -> int:
        found = table.get(text)
        if found is None:
            found = table[text] = len(table)
        return found

    def _signature(self, variants: dict[str, str], degraded: Sequence[str]) -> int:
        key = (tuple(sorted(variants.items())), "experiment" in degraded)
        found = self.signatures.get(key)
        if found is None:
            found = self.signatures[key] = len(self.signatures)
        return found

    def extend(self, entries: Sequence[Stored]) -> None:
        """Append ``entries`` (the log's next ones, in order) to the table."""
        imp, out, exp, err = self.impressions, self.outcomes, self.exposures, self.errors
        i_user, i_request, i_item = imp.ints["user"], imp.ints["request"], imp.ints["item"]
        i_sig, i_deg, i_day, i_index = (
            imp.ints["signature"],
            imp.ints["degraded"],
            imp.ints["day"],
            imp.ints["index"],
        )
        i_latency = imp.floats["latency"]
        users, requests = self.users, self.requests
        # The impressions of one answer are consecutive and share its lineage: decode the
        # request-level fields once per answer.
        last_request, request = "", -1
        signature, degraded, latency = 0, 0, 0.0
        index = self.entries
        for position, event in entries:
            index += 1
            if event is None:
                self.invalid += 1
                continue
            kind = event.type
            if kind == "impression":
                request_id = event.request_id
                if request_id != last_request or not request_id:
                    last_request = request_id
                    request = self._intern(requests, request_id) if request_id else -1
                    signature = self._signature(dict(event.variants), event.degraded)
                    degraded = 1 if len(event.degraded) else 0
                    latency = event.latency_ms
                user = users.get(event.user_id)
                if user is None:
                    user = users[event.user_id] = len(users)
                i_user.append(user)
                i_request.append(request)
                i_item.append(event.item_id)
                i_sig.append(signature)
                i_deg.append(degraded)
                i_day.append(event.ts_ms // DAY_MS)
                i_index.append(index - 1)
                i_latency.append(latency)
            elif kind == "click" or kind == "conversion":
                out.ints["conversion"].append(1 if kind == "conversion" else 0)
                out.ints["request"].append(
                    self._intern(requests, event.request_id) if event.request_id else -1
                )
                out.ints["item"].append(event.item_id)
                out.ints["index"].append(index - 1)
            elif kind == "exposure":
                user = self._intern(users, event.user_id)
                version = self._intern(self.versions, event.book_version)
                for pair in event.variants.items():
                    arm = self.arms.get(pair)
                    if arm is None:
                        arm = self.arms[pair] = len(self.arms)
                    exp.ints["user"].append(user)
                    exp.ints["arm"].append(arm)
                    exp.ints["version"].append(version)
                    exp.ints["index"].append(index - 1)
                    exp.ints["at"].append(appended_ms(position))
            elif kind == "error":
                err.ints["user"].append(self._intern(users, event.user_id))
                err.ints["signature"].append(self._signature(dict(event.variants), event.degraded))
                err.ints["index"].append(index - 1)
                err.floats["latency"].append(event.latency_ms)
        if entries:
            if not self.first_position:
                self.first_position = entries[0][0]
            self.position = entries[-1][0]
        self.entries = index


async def refresh(
    client: AsyncRedis, tenant: str, table: LogTable | None, page: int = 5000
) -> tuple[LogTable, int, bool]:
    """``table`` (or a new one) brought up to the end of ``tenant``'s log: the table, the
    entries read and whether it was rebuilt from the start (no table, the audit stream grew
    since it was started, or the log's first entry is not the one it read first)."""
    audit = int(await client.xlen(keys.audit(tenant)))
    first = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await client.xrange(keys.events(tenant), count=1),
    )
    first_position = first[0][0].decode() if first else ""
    rebuilt = (
        table is None
        or table.audit_length != audit
        or (bool(table.first_position) and table.first_position != first_position)
    )
    if table is None or rebuilt:
        table = LogTable(audit_length=audit)
    read = 0
    # Reading makes millions of short-lived acyclic objects (entries, messages): the cyclic
    # collector would scan the heap over and over for nothing (it halved the speed).
    collecting = gc.isenabled()
    gc.disable()
    try:
        async for entries in iter_log(client, tenant, after=table.position, page=page):
            table.extend(entries)
            read += len(entries)
    finally:
        if collecting:
            gc.enable()
    return table, read, rebuilt


async def catalogue_items(client: AsyncRedis, tenant: str) -> int:
    """The number of items the feature store materialised for ``tenant`` (0 when unknown)."""
    raw = await client.hget(keys.meta(tenant), "items")
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def _day(day: int) -> str:
    return datetime.fromtimestamp(day * DAY_MS / 1000, UTC).strftime("%Y-%m-%d")


def _spread(items: I64, catalogue: int) -> experiment_pb2.Spread:
    if items.size == 0:
        return experiment_pb2.Spread()
    _, counts = np.unique(items, return_counts=True)
    padded = np.zeros(catalogue, dtype=np.float64)
    padded[: counts.size] = counts
    return experiment_pb2.Spread(
        items_shown=int(counts.size),
        coverage=stats.coverage(counts, catalogue),
        gini=stats.gini(padded),
    )


def _lift(comparison: stats.Comparison) -> experiment_pb2.Lift:
    return experiment_pb2.Lift(
        control_mean=comparison.control_mean,
        treatment_mean=comparison.treatment_mean,
        absolute_lift=comparison.absolute_lift,
        absolute_ci=experiment_pb2.Interval(
            low=comparison.absolute_ci[0], high=comparison.absolute_ci[1]
        ),
        relative_lift=comparison.relative_lift,
        relative_ci=experiment_pb2.Interval(
            low=comparison.relative_ci[0], high=comparison.relative_ci[1]
        ),
        p_value=comparison.p_value,
        probability_to_beat=comparison.probability_to_beat,
        expected_loss=comparison.expected_loss,
        variance_reduction=comparison.variance_reduction,
    )


def _joined(keys_: I64, outcome_keys: I64) -> B:
    return np.isin(keys_, np.unique(outcome_keys))


def compute(
    table: LogTable, spec: ReportSpec, tenant: str, catalogue: int = 0
) -> experiment_pb2.Report:
    """The report of ``spec``'s experiment from ``table`` (see the module docstring);
    ``catalogue`` is the feature store's item count of the tenant (0 when unknown)."""
    names = [name for name, _ in spec.variants]
    n_variants = len(names)
    n_users = len(table.users)
    quality = experiment_pb2.DataQuality(invalid_entries=table.invalid)

    # Exposures of the experiment: each user's variant.
    arm_variant = np.full(max(1, len(table.arms)), ABSENT, dtype=np.int64)
    for (experiment, exposed), arm in table.arms.items():
        if experiment == spec.key:
            arm_variant[arm] = names.index(exposed) if exposed in names else UNKNOWN
    exposures = table.exposures
    e_variant = arm_variant[exposures.column("arm")] if len(exposures) else np.zeros(0, np.int64)
    mine = e_variant != ABSENT
    e_variant = e_variant[mine]
    e_user = exposures.column("user")[mine] if len(exposures) else np.zeros(0, np.int64)
    e_index = exposures.column("index")[mine] if len(exposures) else np.zeros(0, np.int64)
    e_at = exposures.column("at")[mine] if len(exposures) else np.zeros(0, np.int64)
    e_version = exposures.column("version")[mine] if len(exposures) else np.zeros(0, np.int64)
    quality.exposures_of_unknown_variants = int((e_variant == UNKNOWN).sum())
    user_variant = np.full(max(1, n_users), ABSENT, dtype=np.int64)
    if e_user.size:
        pairs = np.unique(np.stack([e_user, e_variant]), axis=1)
        per_user = np.bincount(pairs[0], minlength=user_variant.size)
        user_variant[pairs[0]] = pairs[1]
        user_variant[per_user > 1] = SEVERAL
    quality.users_in_several_variants = int((user_variant == SEVERAL).sum())
    version_names = {index: name for name, index in table.versions.items()}
    if e_version.size:
        counted = np.bincount(e_version)
        quality.book_versions.extend(
            experiment_pb2.BookVersionCount(book_version=version_names[v], exposures=int(c))
            for v, c in enumerate(counted)
            if c
        )
    first_index = int(e_index.min()) if e_index.size else table.entries
    first_exposure_ms = int(e_at.min()) if e_at.size else 0
    users_of = np.bincount(user_variant[user_variant >= 0], minlength=n_variants)[:n_variants]
    counted_exposures = (e_variant >= 0) & (user_variant[e_user] == e_variant)
    exposures_of = np.bincount(e_variant[counted_exposures], minlength=n_variants)[:n_variants]

    # Each request's variant of the experiment, from its signature.
    signature_variant = np.full(max(1, len(table.signatures)), ABSENT, dtype=np.int64)
    for (variants, fallback), signature in table.signatures.items():
        named = dict(variants).get(spec.key)
        if named is None:
            continue
        if fallback:
            signature_variant[signature] = FALLBACK
        else:
            signature_variant[signature] = names.index(named) if named in names else UNKNOWN

    imp = table.impressions
    i_user, i_request, i_item = imp.column("user"), imp.column("request"), imp.column("item")
    i_index, i_day = imp.column("index"), imp.column("day")
    i_variant = signature_variant[imp.column("signature")] if len(imp) else np.zeros(0, np.int64)
    fallback = i_variant == FALLBACK
    quality.fallback_requests = int(np.unique(i_request[fallback]).size)
    assigned = i_variant >= 0
    kept = assigned & (user_variant[i_user] == i_variant) if len(imp) else assigned
    quality.impressions_outside_exposure = int((assigned & ~kept).sum())

    # Outcomes joined to impressions by (request, item).
    out = table.outcomes
    o_request, o_item = out.column("request"), out.column("item")
    o_conversion, o_index = out.column("conversion").astype(bool), out.column("index")
    # Items as dense codes first: a client may name any item id up to 2**63 - 1, and
    # request * (max item + 1) + item would overflow int64 and join unrelated requests.
    _, item_codes = np.unique(np.concatenate([i_item, o_item]), return_inverse=True)
    width = int(item_codes.max(initial=0)) + 1
    i_key = i_request * width + item_codes[: i_item.size]
    o_key = np.where(o_request >= 0, o_request * width + item_codes[i_item.size :], -1)
    clicked = _joined(i_key, o_key[~o_conversion & (o_request >= 0)])
    converted = _joined(i_key, o_key[o_conversion & (o_request >= 0)])
    quality.unmatched_outcomes = int(((o_request < 0) | ~np.isin(o_key, i_key)).sum())

    # Per-user sums over the kept impressions.
    size = max(1, n_users)
    k_user = i_user[kept]
    impressions_u = np.bincount(k_user, minlength=size).astype(np.float64)
    clicks_u = np.bincount(k_user, weights=clicked[kept], minlength=size).astype(np.float64)
    conversions_u = np.bincount(k_user, weights=converted[kept], minlength=size).astype(np.float64)

    # CUPED covariates: each user's metrics over the log before the first exposure.
    before = i_index < first_index
    early = o_index < first_index
    pre_clicked = _joined(i_key[before], o_key[~o_conversion & early & (o_request >= 0)])
    pre_converted = _joined(i_key[before], o_key[o_conversion & early & (o_request >= 0)])
    pre_impressions = np.bincount(i_user[before], minlength=size).astype(np.float64)
    pre_clicks = np.bincount(i_user[before], weights=pre_clicked, minlength=size).astype(np.float64)
    pre_conversions = np.bincount(i_user[before], weights=pre_converted, minlength=size).astype(
        np.float64
    )

    members = [np.flatnonzero(user_variant == v) for v in range(n_variants)]
    compared = np.concatenate(members) if members else np.zeros(0, np.int64)
    covariate_users = int((pre_impressions[compared] > 0).sum())

    def covariate(numerator: F64) -> F64 | None:
        seen = pre_impressions[compared]
        if not (seen > 0).any():
            return None
        pooled = float(numerator[compared].sum() / seen.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pre_impressions > 0, numerator / pre_impressions, pooled)

    metrics = {
        "ctr": (clicks_u, covariate(pre_clicks)),
        "conversion_rate": (conversions_u, covariate(pre_conversions)),
    }

    # Requests and errors per variant.
    err = table.errors
    r_variant = signature_variant[err.column("signature")] if len(err) else np.zeros(0, np.int64)
    r_user = err.column("user")
    r_kept = (r_variant >= 0) & (user_variant[r_user] == r_variant) if len(err) else r_variant >= 0
    r_variant, r_latency = r_variant[r_kept], err.reals("latency")[r_kept]
    i_degraded, i_latency = imp.column("degraded"), imp.reals("latency")

    catalogue_size = max(catalogue, int(np.unique(i_item).size))
    report = experiment_pb2.Report(
        experiment_key=spec.key,
        tenant=tenant,
        book_version=spec.book_version,
        log_position=table.position,
        entries=table.entries,
        first_exposure_ms=first_exposure_ms,
        alpha=spec.alpha,
        data_quality=quality,
        catalogue_size=catalogue_size,
        covariate_users=covariate_users,
    )
    weights = [weight for _, weight in spec.variants]
    total_weight = sum(weights)
    srm = stats.sample_ratio([int(u) for u in users_of], weights)
    report.srm.CopyFrom(
        experiment_pb2.SampleRatio(
            observed=list(srm.observed),
            expected_share=list(srm.expected_share),
            chi2=srm.chi2 if np.isfinite(srm.chi2) else 1e308,
            p_value=srm.p_value,
            mismatch=srm.mismatch,
        )
    )
    control = members[0]
    for v, name in enumerate(names):
        mask = kept & (i_variant == v)
        requests, first = np.unique(i_request[mask], return_index=True)
        degraded = i_degraded[mask][first]
        latency = np.concatenate([i_latency[mask][first], r_latency[r_variant == v]])
        latency = latency[latency > 0]
        errors = int((r_variant == v).sum())
        impressions = int(mask.sum())
        clicks = int(clicked[mask].sum())
        conversions = int(converted[mask].sum())
        variant = experiment_pb2.VariantReport(
            variant_key=name,
            weight=weights[v] / total_weight if total_weight > 0 else 0.0,
            users=int(users_of[v]),
            exposures=int(exposures_of[v]),
            requests=int(requests.size),
            impressions=impressions,
            clicks=clicks,
            conversions=conversions,
            ctr=clicks / impressions if impressions else 0.0,
            conversion_rate=conversions / impressions if impressions else 0.0,
            errors=errors,
            spread=_spread(i_item[mask], catalogue_size),
        )
        if v > 0:
            treated = members[v]
            for metric, (numerator, pre) in metrics.items():
                comparison = experiment_pb2.MetricComparison(metric=metric)
                try:
                    comparison.lift.CopyFrom(
                        _lift(
                            stats.compare_ratio(
                                numerator[control],
                                impressions_u[control],
                                numerator[treated],
                                impressions_u[treated],
                                alpha=spec.alpha,
                            )
                        )
                    )
                    if pre is not None:
                        comparison.cuped.CopyFrom(
                            _lift(
                                stats.compare_ratio(
                                    numerator[control],
                                    impressions_u[control],
                                    numerator[treated],
                                    impressions_u[treated],
                                    pre[control],
                                    pre[treated],
                                    alpha=spec.alpha,
                                )
                            )
                        )
                except ValueError as exc:
                    comparison.not_computed = str(exc)
                variant.comparisons.append(comparison)
        answered = int(requests.size)
        values = {
            "degraded_share": (float(degraded.mean()) if answered else 0.0, answered),
            "p99_latency_ms": (
                float(np.percentile(latency, 99)) if latency.size else 0.0,
                int(latency.size),
            ),
            "error_rate": (
                errors / (answered + errors) if answered + errors else 0.0,
                answered + errors,
            ),
        }
        for guard, bound in spec.guardrails:
            value, basis = values[guard]
            variant.guardrails.append(
                experiment_pb2.Guardrail(
                    name=guard, bound=bound, value=value, requests=basis, passed=value <= bound
                )
            )
        report.variants.append(variant)
        days = i_day[mask]
        for day in np.unique(days):
            on_day = mask & (i_day == day)
            shown = int(on_day.sum())
            day_clicks = int(clicked[on_day].sum())
            report.daily.append(
                experiment_pb2.DailyVariant(
                    day=_day(int(day)),
                    variant_key=name,
                    users=int(np.unique(i_user[on_day]).size),
                    impressions=shown,
                    clicks=day_clicks,
                    conversions=int(converted[on_day].sum()),
                    ctr=day_clicks / shown if shown else 0.0,
                    spread=_spread(i_item[on_day], catalogue_size),
                )
            )
    report.daily.sort(key=lambda d: (d.day, names.index(d.variant_key)))
    return report


async def build_report(
    client: AsyncRedis,
    tenant: str,
    spec: ReportSpec,
    table: LogTable | None = None,
    page: int = 5000,
    previous: experiment_pb2.Report | None = None,
) -> tuple[experiment_pb2.Report, LogTable]:
    """Refresh ``table`` from ``tenant``'s log and compute ``spec``'s report: the report
    (with ``entries_read``, ``rebuilt`` and ``compute_ms`` set) and the table to keep.
    ``previous``, the last report of the same spec from the same table, is answered again
    (not computed) when the log gained nothing since it was made."""
    started = time.perf_counter()
    table, read, rebuilt = await refresh(client, tenant, table, page)
    if (
        previous is not None
        and not rebuilt
        and read == 0
        and previous.log_position == table.position
        and previous.entries == table.entries
    ):
        report = experiment_pb2.Report()
        report.CopyFrom(previous)
    else:
        report = compute(table, spec, tenant, await catalogue_items(client, tenant))
    report.entries_read = read
    report.rebuilt = rebuilt
    report.compute_ms = (time.perf_counter() - started) * 1000
    return report, table
