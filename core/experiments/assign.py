"""Assignment of a request to the variants of an experiment book: a pure function.

GrowthBook's ``runExperiment`` steps that RecMesh supports (targeting by tenant, hash
attribute, namespace, coverage, weights), with its hashing (:mod:`core.experiments.growthbook`),
so an SDK given the same experiment assigns the same user the same variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.experiments.book import ExperimentBook, Variant
from core.experiments.growthbook import choose_variation, gb_hash, in_namespace
from core.experiments.interleaving import INTERLEAVED
from mesh.errors import InvalidArgument


@dataclass(frozen=True)
class Assignment:
    """A request's place in one experiment.

    Attributes:
        experiment_key: the experiment.
        variant_key: the variant the request is bucketed into.
        variant_index: position of that variant, 0 being the control; -1 for an
            interleaving experiment, whose users see both variants.
        params: the variant's knobs (read-only).
        in_experiment: GrowthBook's ``inExperiment``; True for every assignment :func:`assign`
            returns, since requests not bucketed get no assignment at all. Exposure logging
            should key on it.
        hash_value: the GrowthBook bucket hash of the request, in [0, 1).
        arms: an interleaving experiment's two variants, A (the control) then B, which the
            request's answer merges by team draft (``variant_key`` is then
            :data:`~core.experiments.interleaving.INTERLEAVED` and ``params`` empty);
            empty for every other experiment.
    """

    experiment_key: str
    variant_key: str
    variant_index: int
    params: Mapping[str, str]
    in_experiment: bool
    hash_value: float
    arms: tuple[Variant, ...] = ()


def assign(book: ExperimentBook, *, tenant: str, attributes: Mapping[str, str]) -> list[Assignment]:
    """Bucket one request into every experiment it is eligible for.

    For each experiment, in book order, the steps of GrowthBook's ``runExperiment`` that
    RecMesh supports are applied, and the first that fails skips the experiment: inactive;
    tenant not targeted; hash attribute missing or empty; outside the namespace slice; hash
    outside every bucket range (not covered). A request covered by an interleaving
    experiment is in it whichever range its hash falls in (it sees both variants: the
    assignment's ``arms``). Skipped experiments yield no assignment, and the
    caller uses the experiment's control params (see :func:`control_params`) or its defaults.

    The function is pure: the result depends only on its arguments, so the same request is
    always assigned the same way, by any process.

    Args:
        book: the experiments.
        tenant: the requesting tenant.
        attributes: request attributes (e.g. ``user_id``); only each experiment's hash
            attribute is read.

    Returns:
        One assignment per experiment the request is bucketed into, in book order.

    Raises:
        InvalidArgument: ``tenant`` is empty (field ``tenant``), or a hash attribute's value
            is not a string (field ``attributes.<name>``).
    """
    if not tenant:
        raise InvalidArgument("tenant must be a non-empty string", field="tenant")
    assignments: list[Assignment] = []
    for experiment in book.experiments:
        if not experiment.targets(tenant):
            continue
        value = attributes.get(experiment.hash_attribute, "")
        if not isinstance(value, str):
            raise InvalidArgument(
                f"attribute {experiment.hash_attribute!r} must be a string",
                field=f"attributes.{experiment.hash_attribute}",
            )
        if not value:
            continue
        if experiment.namespace is not None and not in_namespace(value, experiment.namespace):
            continue
        bucket = gb_hash(experiment.seed, value, experiment.hash_version)
        index = choose_variation(bucket, experiment.bucket_ranges)
        if index < 0:
            continue
        if experiment.type == "interleave":
            assignments.append(
                Assignment(
                    experiment_key=experiment.key,
                    variant_key=INTERLEAVED,
                    variant_index=-1,
                    params={},
                    in_experiment=True,
                    hash_value=bucket,
                    arms=experiment.variants,
                )
            )
            continue
        variant = experiment.variants[index]
        assignments.append(
            Assignment(
                experiment_key=experiment.key,
                variant_key=variant.key,
                variant_index=index,
                params=variant.params,
                in_experiment=True,
                hash_value=bucket,
            )
        )
    return assignments


def control_params(book: ExperimentBook, tenant: str) -> dict[str, Mapping[str, str]]:
    """The control (first) variant's params of every active experiment open to ``tenant``.

    This is what a request of ``tenant`` gets from each experiment it is not bucketed into,
    and what the gateway applies to every request while the experiment service is down.

    Args:
        book: the experiments.
        tenant: the tenant.

    Returns:
        Experiment key to control params, in book order.
    """
    return {
        experiment.key: experiment.variants[0].params
        for experiment in book.experiments
        if experiment.targets(tenant)
    }
