"""Who counts as exposed when experiments share a knob: both arms of an experiment are
judged the same way, so its comparison stays between like populations."""

from __future__ import annotations

from recmesh.experiment.v1 import experiment_pb2

from gateway.exposures import applied

KNOBS = {"e": frozenset({"retrieval.k"}), "f": frozenset({"retrieval.k"})}


def assignment(key: str, variant: str, **params: str) -> experiment_pb2.Assignment:
    return experiment_pb2.Assignment(experiment_key=key, variant_key=variant, params=params)


def exposed(*assignments: experiment_pb2.Assignment) -> list[tuple[str, str]]:
    merged: dict[str, str] = {}
    for a in assignments:
        merged.update(a.params)
    return [(a.experiment_key, a.variant_key) for a in applied(assignments, merged, KNOBS)]


def test_alone_both_arms_are_exposed() -> None:
    assert exposed(assignment("e", "control")) == [("e", "control")]
    assert exposed(assignment("e", "treat", **{"retrieval.k": "600"})) == [("e", "treat")]


def test_a_later_experiment_overriding_the_knob_unexposes_either_arm() -> None:
    wide = assignment("f", "wide", **{"retrieval.k": "450"})
    assert exposed(assignment("e", "control"), wide) == [("f", "wide")]
    assert exposed(assignment("e", "treat", **{"retrieval.k": "600"}), wide) == [("f", "wide")]


def test_an_experiment_the_gateway_book_does_not_know_is_judged_by_its_own_params() -> None:
    stranger = assignment("g", "on", **{"ranking.heavy": "0"})
    merged = {"ranking.heavy": "0"}
    assert [a.experiment_key for a in applied([stranger], merged, KNOBS)] == ["g"]
    assert applied([stranger], {"ranking.heavy": "1"}, KNOBS) == []
