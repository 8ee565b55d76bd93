"""The experiment book: its file format, loading and validation, and its version.

Assignment of a request to variants is :mod:`core.experiments.assign`.

An experiment book is loaded once, at start-up, from a JSON file (``config/experiments.json``
in development) and validated strictly: any problem is a :class:`~mesh.errors.ConfigError`
whose message names the file, the experiment and the field. The gateway keeps its own copy of
the same file so that it can fall back to :func:`control_params` when the experiment service
is down.

File format::

    {"experiments": [
      {"key": "retrieval-k",                 # required, unique, non-empty
       "seed": "retrieval-k",                # optional, defaults to key
       "hash_version": 2,                    # optional, 1 or 2, defaults to 1 (GrowthBook's)
       "hash_attribute": "user_id",          # optional, defaults to "user_id"
       "coverage": 1.0,                      # optional, in [0, 1], defaults to 1
       "tenants": ["demo", "acme"],          # optional, non-empty; omitted = every tenant
       "namespace": ["retrieval-layer", 0.0, 1.0],  # optional [id, start, end), 0<=start<end<=1
       "variants": [                         # required, at least 2; the first is the control
         {"key": "control", "weight": 0.5, "params": {"retrieval.k": "300"}},
         {"key": "treatment", "weight": 0.5, "params": {"retrieval.k": "600"}}],
       "guardrails": {"degraded_share": 0.05, "p99_latency_ms": 120, "error_rate": 0.01},
                                             # optional; each bound optional (see below)
       "type": "ab",                         # optional, "ab" (default) or "interleave"
       "active": true}                       # optional, defaults to true
    ]}

Variant ``weight`` is given on every variant or on none (then traffic is split evenly); the
weights must lie in [0, 1] and sum to 1 within GrowthBook's tolerance of 0.99 to 1.01, so the
bucket ranges used are always the configured ones. ``params`` maps knob names (e.g.
``retrieval.k``, ``ranking.heavy``, ``ranking.prerank_keep``) to string values that the gateway
applies to the pipeline; it defaults to ``{}``. Unknown keys anywhere are rejected.

``guardrails`` bounds what an experiment's report checks per variant (``docs/experiments.md``,
"Report"): ``degraded_share`` (share of the variant's requests with a stage fallen back, in
[0, 1]), ``p99_latency_ms`` (99th percentile of the gateway's time to answer, > 0) and
``error_rate`` (share of the variant's requests the gateway failed, in [0, 1]). A variant
passes a guardrail while its value is at most the bound; a bound left out is not checked.

``"type": "interleave"`` makes an interleaving experiment (``docs/experiments.md``,
"Interleaving"): every user it covers sees both of its exactly two variants at once, merged
by team draft, the first (A, the control) against the second (B). Its variants carry no
``weight``, and their params are ranking knobs the ranking service can apply per arm
(:data:`INTERLEAVE_PARAMS`): ``ranking.heavy`` (``on``/``off``), ``ranking.prerank_keep``
and ``ranking.heavy_keep`` (counts >= 1), ``ranking.diversity`` (``mmr``, ``cap``,
``none``), ``ranking.mmr_lambda`` (in [0, 1]), ``ranking.ctr_weight`` (>= 0) and
``ranking.freshness_boost``. A request gets one merged list, so two active interleaving
experiments open to a common tenant must slice one namespace into disjoint ranges.

A loaded book has a ``version``: the first 16 hex digits of the SHA-256 of its canonical JSON
(object keys sorted, no whitespace, lists in file order). Reformatting the file or reordering
the keys of an object keeps the version; any other change gives a new one. The experiment
service returns it with every answer, so a caller that caches answers (the gateway's
:class:`~gateway.assignments.AssignmentCache`) notices a new book.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from core.experiments.growthbook import (
    WEIGHT_SUM_MAX,
    WEIGHT_SUM_MIN,
    BucketRange,
    HashVersion,
    Namespace,
    get_bucket_ranges,
    get_equal_weights,
)
from mesh.errors import ConfigError
from mesh.paths import CONFIG_DIR
from mesh.settings import env

DEFAULT_HASH_ATTRIBUTE = "user_id"

ExperimentType = Literal["ab", "interleave"]


def experiments_file() -> Path:
    """The experiment book settings field, env ``RECMESH_EXPERIMENTS`` (the experiment
    service and the gateway read the same book)."""
    value: Path = env(
        "RECMESH_EXPERIMENTS",
        CONFIG_DIR / "experiments.json",
        doc="experiment book (JSON) to assign from",
    )
    return value


_BOOK_KEYS = frozenset({"experiments"})
_EXPERIMENT_KEYS = frozenset(
    {
        "key",
        "seed",
        "hash_version",
        "hash_attribute",
        "coverage",
        "tenants",
        "namespace",
        "variants",
        "guardrails",
        "type",
        "active",
    }
)
_VARIANT_KEYS = frozenset({"key", "weight", "params"})
_GUARDRAIL_KEYS = frozenset({"degraded_share", "p99_latency_ms", "error_rate"})


@dataclass(frozen=True)
class Guardrails:
    """The bounds an experiment's report checks on every variant; ``None`` = not checked.

    Attributes:
        degraded_share: most share of a variant's requests answered with a stage fallen
            back, in [0, 1].
        p99_latency_ms: most 99th percentile of the gateway's time to answer, ms, > 0.
        error_rate: most share of a variant's requests the gateway failed, in [0, 1].
    """

    degraded_share: float | None = None
    p99_latency_ms: float | None = None
    error_rate: float | None = None

    def bounds(self) -> list[tuple[str, float]]:
        """The bounds set, as ``(name, bound)`` in the order degraded_share,
        p99_latency_ms, error_rate."""
        named = [
            ("degraded_share", self.degraded_share),
            ("p99_latency_ms", self.p99_latency_ms),
            ("error_rate", self.error_rate),
        ]
        return [(name, bound) for name, bound in named if bound is not None]


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment.

    Attributes:
        key: name of the variant, unique within its experiment.
        weight: share of covered traffic, in [0, 1].
        params: read-only knob name to value mapping the gateway applies.
    """

    key: str
    weight: float
    params: Mapping[str, str]


@dataclass(frozen=True)
class Experiment:
    """A validated experiment definition; see the module docstring for each field's meaning.

    Attributes:
        key: unique experiment key.
        seed: hash seed.
        hash_version: GrowthBook hash version.
        hash_attribute: name of the request attribute that is hashed.
        coverage: fraction of eligible traffic included, in [0, 1].
        tenants: tenants targeted, or ``None`` for every tenant.
        namespace: ``(id, start, end)`` slice, or ``None``.
        variants: two or more variants; index 0 is the control.
        active: inactive experiments assign no one.
        guardrails: the bounds its report checks per variant.
        type: ``"ab"``, or ``"interleave"`` for an interleaving experiment (two variants,
            the arms, shown together to every user covered).
    """

    key: str
    seed: str
    hash_version: HashVersion
    hash_attribute: str
    coverage: float
    tenants: frozenset[str] | None
    namespace: Namespace | None
    variants: tuple[Variant, ...]
    active: bool
    guardrails: Guardrails = Guardrails()
    type: ExperimentType = "ab"

    def targets(self, tenant: str) -> bool:
        """Whether the experiment is active and open to ``tenant``."""
        return self.active and self.declared_for(tenant)

    def declared_for(self, tenant: str) -> bool:
        """Whether the experiment is open to ``tenant``, active or not (whose report the
        tenant may read)."""
        return self.tenants is None or tenant in self.tenants

    @cached_property
    def bucket_ranges(self) -> list[BucketRange]:
        """The GrowthBook bucket range of each variant, coverage applied."""
        return get_bucket_ranges(
            len(self.variants), self.coverage, [variant.weight for variant in self.variants]
        )


@dataclass(frozen=True)
class ExperimentBook:
    """Every experiment of a deployment, in file order (which is also the order of results).

    Attributes:
        experiments: the experiments; keys are unique.
        version: 16 hex digits identifying the book's content (see the module docstring).
    """

    experiments: tuple[Experiment, ...]
    version: str


def load_experiments(path: Path) -> ExperimentBook:
    """Read and validate an experiment book.

    Args:
        path: the JSON file.

    Returns:
        The validated, immutable book.

    Raises:
        ConfigError: the file cannot be read, is not JSON, repeats a key inside one JSON
            object, or breaks any rule of the format; the message names the file, the
            experiment (by key, or by index when the key itself is bad) and the field, and
            ``field`` holds the dotted path, e.g. ``experiments[0].variants[1].weight``.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read experiment config: {exc}") from exc
    try:
        document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: key {exc.key!r} appears twice in one JSON object") from exc
    return _parse_book(document, source)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


@dataclass(frozen=True)
class _Where:
    """Where in the file a value sits, for error messages."""

    source: str
    label: str
    path: str

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {self.label}: field {field!r}: {problem}",
            field=f"{self.path}.{field}",
        )


def _parse_book(document: object, source: str) -> ExperimentBook:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: top level must be an object with key 'experiments'")
    unknown = sorted(set(document) - _BOOK_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key {unknown[0]!r} (allowed: 'experiments')",
            field=unknown[0],
        )
    raw_experiments = document.get("experiments")
    if not isinstance(raw_experiments, list):
        raise ConfigError(f"{source}: 'experiments' must be a list", field="experiments")
    experiments: list[Experiment] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_experiments):
        experiment = _parse_experiment(raw, index, source)
        if experiment.key in seen:
            raise ConfigError(
                f"{source}: experiment {experiment.key!r}: duplicate experiment key",
                field=f"experiments[{index}].key",
            )
        seen.add(experiment.key)
        experiments.append(experiment)
    _check_interleaving_overlap(experiments, source)
    return ExperimentBook(experiments=tuple(experiments), version=_version(document))


def _version(document: dict[str, object]) -> str:
    """The book's version: a digest of ``document`` that ignores formatting and key order."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _parse_experiment(raw: object, index: int, source: str) -> Experiment:
    path = f"experiments[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {path}: must be an object", field=path)
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise ConfigError(
            f"{source}: {path}: 'key' must be a non-empty string", field=f"{path}.key"
        )
    where = _Where(source, f"experiment {key!r}", path)
    _reject_unknown(raw, _EXPERIMENT_KEYS, where)

    seed = raw.get("seed", key)
    if not isinstance(seed, str) or not seed:
        raise where.error("seed", "must be a non-empty string")
    hash_attribute = raw.get("hash_attribute", DEFAULT_HASH_ATTRIBUTE)
    if not isinstance(hash_attribute, str) or not hash_attribute:
        raise where.error("hash_attribute", "must be a non-empty string")
    active = raw.get("active", True)
    if not isinstance(active, bool):
        raise where.error("active", "must be true or false")
    coverage = _fraction(raw.get("coverage", 1.0), where, "coverage")
    return Experiment(
        key=key,
        seed=seed,
        hash_version=_hash_version(raw.get("hash_version", 1), where),
        hash_attribute=hash_attribute,
        coverage=coverage,
        tenants=_tenants(raw.get("tenants"), where),
        namespace=_namespace(raw.get("namespace"), where),
        variants=_variants(raw.get("variants"), where),
        active=active,
        guardrails=_guardrails(raw.get("guardrails"), where),
        type=_type(raw, where),
    )


def _reject_unknown(
    raw: dict[str, object], allowed: frozenset[str], where: _Where, prefix: str = ""
) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise where.error(
            prefix + unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})"
        )


def _number(value: object) -> float | None:
    """``value`` as a finite float when it is a JSON number, else None (booleans excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fraction(value: object, where: _Where, field: str) -> float:
    number = _number(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise where.error(field, f"must be a number in [0, 1], got {value!r}")
    return number


def _hash_version(value: object, where: _Where) -> HashVersion:
    if value == 1 and not isinstance(value, bool):
        return 1
    if value == 2 and not isinstance(value, bool):
        return 2
    raise where.error("hash_version", f"must be 1 or 2, got {value!r}")


def _tenants(value: object, where: _Where) -> frozenset[str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(tenant, str) and tenant for tenant in value)
    ):
        raise where.error(
            "tenants", "must be a non-empty list of non-empty strings (omit it for all tenants)"
        )
    return frozenset(value)


def _namespace(value: object, where: _Where) -> Namespace | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3:
        raise where.error("namespace", "must be [id, start, end]")
    namespace_id, raw_start, raw_end = value
    start, end = _number(raw_start), _number(raw_end)
    if not isinstance(namespace_id, str) or not namespace_id:
        raise where.error("namespace", "id must be a non-empty string")
    if start is None or end is None or not 0.0 <= start < end <= 1.0:
        raise where.error("namespace", f"needs 0 <= start < end <= 1, got {value[1:]!r}")
    return (namespace_id, start, end)


def _variants(value: object, where: _Where) -> tuple[Variant, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise where.error("variants", "must list at least 2 variants (the first is the control)")
    weighted = ["weight" in raw for raw in value if isinstance(raw, dict)]
    if any(weighted) and not all(weighted):
        raise where.error("variants", "give a weight to every variant or to none")
    weights = None if any(weighted) else get_equal_weights(len(value))
    variants: list[Variant] = []
    for index, raw in enumerate(value):
        variant = _variant(raw, where, index, None if weights is None else weights[index])
        if any(variant.key == earlier.key for earlier in variants):
            raise where.error(f"variants[{index}].key", f"duplicate variant key {variant.key!r}")
        variants.append(variant)
    total = sum(variant.weight for variant in variants)
    if not WEIGHT_SUM_MIN <= total <= WEIGHT_SUM_MAX:
        raise where.error("variants", f"weights sum to {total:g}; they must sum to 1")
    return tuple(variants)


def _variant(raw: object, where: _Where, index: int, weight: float | None) -> Variant:
    field = f"variants[{index}]"
    if not isinstance(raw, dict):
        raise where.error(field, "must be an object")
    _reject_unknown(raw, _VARIANT_KEYS, where, prefix=f"{field}.")
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise where.error(f"{field}.key", "must be a non-empty string")
    if weight is None:
        weight = _fraction(raw["weight"], where, f"{field}.weight")
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(
        isinstance(name, str) and name and isinstance(setting, str)
        for name, setting in params.items()
    ):
        raise where.error(f"{field}.params", "must map non-empty names to string values")
    return Variant(key=key, weight=weight, params=MappingProxyType(dict(params)))


def _guardrails(value: object, where: _Where) -> Guardrails:
    if value is None:
        return Guardrails()
    if not isinstance(value, dict):
        raise where.error("guardrails", "must be an object of bounds")
    _reject_unknown(value, _GUARDRAIL_KEYS, where, prefix="guardrails.")
    shares = {
        name: _fraction(value[name], where, f"guardrails.{name}")
        for name in ("degraded_share", "error_rate")
        if name in value
    }
    latency = None
    if "p99_latency_ms" in value:
        latency = _number(value["p99_latency_ms"])
        if latency is None or not latency > 0.0:
            raise where.error(
                "guardrails.p99_latency_ms",
                f"must be a number of ms above 0, got {value['p99_latency_ms']!r}",
            )
    return Guardrails(
        degraded_share=shares.get("degraded_share"),
        p99_latency_ms=latency,
        error_rate=shares.get("error_rate"),
    )


INTERLEAVE_PARAMS: Mapping[str, str] = MappingProxyType(
    {
        "ranking.heavy": "on or off",
        "ranking.prerank_keep": "a count >= 1",
        "ranking.heavy_keep": "a count >= 1",
        "ranking.diversity": "mmr, cap or none",
        "ranking.mmr_lambda": "a number in [0, 1]",
        "ranking.ctr_weight": "a number >= 0",
        "ranking.freshness_boost": "a number",
    }
)
"""The params an interleaving experiment's arms may set, and what each takes."""


def _arm_value_ok(name: str, value: str) -> bool:
    if name == "ranking.heavy":
        return value in ("on", "off")
    if name == "ranking.diversity":
        return value in ("mmr", "cap", "none")
    if name in ("ranking.prerank_keep", "ranking.heavy_keep"):
        return value.isdecimal() and 1 <= int(value) <= 1_000_000
    try:
        number = float(value)
    except ValueError:
        return False
    if not math.isfinite(number):
        return False
    if name == "ranking.mmr_lambda":
        return 0.0 <= number <= 1.0
    if name == "ranking.ctr_weight":
        return number >= 0.0
    return True


def _type(raw: dict[str, object], where: _Where) -> ExperimentType:
    """The experiment's type; for ``interleave``, its variants checked as arms (exactly
    two, no weights, only :data:`INTERLEAVE_PARAMS` with valid values)."""
    kind = raw.get("type", "ab")
    if kind == "ab":
        return "ab"
    if kind != "interleave":
        raise where.error("type", f"must be 'ab' or 'interleave', got {kind!r}")
    variants = raw.get("variants")
    assert isinstance(variants, list)  # _variants checked it before
    if len(variants) != 2:
        raise where.error("variants", "an interleaving experiment has exactly 2 variants")
    for index, variant in enumerate(variants):
        assert isinstance(variant, dict)
        if "weight" in variant:
            raise where.error(
                f"variants[{index}].weight",
                "an interleaving experiment shows both variants to every user: no weights",
            )
        params = variant.get("params", {})
        assert isinstance(params, dict)
        for name, value in params.items():
            if name not in INTERLEAVE_PARAMS:
                raise where.error(
                    f"variants[{index}].params.{name}",
                    f"not a knob an interleaving arm can set (allowed: "
                    f"{', '.join(sorted(INTERLEAVE_PARAMS))})",
                )
            if not _arm_value_ok(name, value):
                raise where.error(
                    f"variants[{index}].params.{name}",
                    f"must be {INTERLEAVE_PARAMS[name]}, got {value!r}",
                )
    return "interleave"


def _check_interleaving_overlap(experiments: list[Experiment], source: str) -> None:
    """Two active interleaving experiments open to a common tenant must be in disjoint
    ranges of one namespace (a request gets one merged list)."""
    interleaving = [
        (index, e) for index, e in enumerate(experiments) if e.type == "interleave" and e.active
    ]
    for later, (index, experiment) in enumerate(interleaving):
        for _, earlier in interleaving[:later]:
            shared = (
                experiment.tenants is None
                or earlier.tenants is None
                or bool(experiment.tenants & earlier.tenants)
            )
            if not shared:
                continue
            apart = (
                experiment.namespace is not None
                and earlier.namespace is not None
                and experiment.namespace[0] == earlier.namespace[0]
                and (
                    experiment.namespace[2] <= earlier.namespace[1]
                    or earlier.namespace[2] <= experiment.namespace[1]
                )
            )
            if not apart:
                raise ConfigError(
                    f"{source}: experiment {experiment.key!r}: field 'namespace': overlaps "
                    f"interleaving experiment {earlier.key!r}; give both disjoint ranges of "
                    "one namespace",
                    field=f"experiments[{index}].namespace",
                )
