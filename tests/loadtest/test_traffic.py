"""The traffic model: Zipf users, tenant mix, clicks, think time, tenant key files."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from loadtest.traffic import (
    TENANT_KEYS_DEV,
    TenantKey,
    TrafficModel,
    ZipfUsers,
    click_event,
    read_tenant_keys,
    write_tenant_keys,
)

DRAWS = 40_000


def harmonic(n: int, exponent: float = 1.0) -> float:
    return sum(math.pow(k, -exponent) for k in range(1, n + 1))


def shares_by_rank(users: ZipfUsers, draws: int = DRAWS) -> list[float]:
    rng = random.Random(7)
    counts = [0] * users.n_users
    rank_of_row = {users.row_of_rank(r): r for r in range(1, users.n_users + 1)}
    for _ in range(draws):
        counts[rank_of_row[users.draw_row(rng)] - 1] += 1
    return [c / draws for c in counts]


def test_zipf_users_follow_the_law_over_every_row() -> None:
    users = ZipfUsers(1000, exponent=1.0, seed=3)
    shares = shares_by_rank(users)
    assert shares[0] == pytest.approx(1 / harmonic(1000), abs=0.01)
    assert sum(shares[:100]) == pytest.approx(harmonic(100) / harmonic(1000), abs=0.02)
    assert sorted(users.row_of_rank(r) for r in range(1, 1001)) == list(range(1000))
    assert users.row_of_rank(1) != 0, "heavy users are spread over the rows by the seed"


def test_exponent_zero_is_uniform_and_ids_use_the_artifact_format() -> None:
    users = ZipfUsers(1000, exponent=0.0, id_format="user-{row}")
    assert sum(sorted(shares_by_rank(users), reverse=True)[:100]) < 0.13
    drawn = users.draw(random.Random(1))
    assert drawn.startswith("user-") and 0 <= int(drawn.removeprefix("user-")) < 1000


def test_a_lower_exponent_is_less_skewed() -> None:
    top_decile = [sum(shares_by_rank(ZipfUsers(1000, exponent=s))[:100]) for s in (0.8, 1.2)]
    assert top_decile[0] < top_decile[1]


def model(click_share: float = 0.2) -> TrafficModel:
    tenants = (TenantKey("demo", "k1", 6), TenantKey("acme", "k2", 3), TenantKey("globex", "k3", 1))
    return TrafficModel(ZipfUsers(500), tenants, click_share=click_share, think_s=(0.3, 1.2))


def test_tenants_are_drawn_by_weight() -> None:
    rng, traffic = random.Random(11), model()
    visits = [traffic.visit(rng) for _ in range(20_000)]
    for name, share in {"demo": 0.6, "acme": 0.3, "globex": 0.1}.items():
        drawn = sum(1 for v in visits if v.tenant.name == name) / len(visits)
        assert drawn == pytest.approx(share, abs=0.02), name
    assert {v.tenant.api_key for v in visits} == {"k1", "k2", "k3"}
    assert {v.num_items for v in visits} == {10}


def test_a_share_of_answers_is_clicked_on_a_returned_item_with_position_bias() -> None:
    rng, traffic = random.Random(5), model()
    items = [str(100 + i) for i in range(10)]
    clicks = [traffic.clicked(rng, items) for _ in range(20_000)]
    taken = [c for c in clicks if c is not None]
    assert len(taken) / len(clicks) == pytest.approx(0.2, abs=0.015)
    assert all(items[position] == item for position, item in taken)
    by_position = [sum(1 for p, _ in taken if p == k) for k in range(10)]
    assert by_position[0] > 2 * by_position[9], "the top of the list gets more clicks"


def test_no_click_without_items_and_think_time_within_bounds() -> None:
    rng, traffic = random.Random(2), model(click_share=1.0)
    assert all(traffic.clicked(rng, []) is None for _ in range(100))
    thinks = [traffic.think(rng) for _ in range(1000)]
    assert min(thinks) >= 0.3 and max(thinks) <= 1.2


def test_click_events_carry_the_recommendation_and_fresh_ids() -> None:
    rng = random.Random(9)
    first = click_event(rng, "u3", "42", "req-1", 2, 1_700_000_000_000)
    second = click_event(rng, "u3", "42", "req-1", 2, 1_700_000_000_000)
    assert first["type"] == "click" and first["item_id"] == "42" and first["position"] == 2
    assert (first["request_id"], first["ts"]) == ("req-1", 1_700_000_000_000)
    assert first["event_id"] != second["event_id"]


def test_invalid_models_are_refused() -> None:
    with pytest.raises(ValueError):
        TrafficModel(ZipfUsers(10), ())
    with pytest.raises(ValueError):
        TrafficModel(ZipfUsers(10), (TenantKey("demo", "k"),), click_share=1.5)
    with pytest.raises(ValueError):
        ZipfUsers(0)


def test_tenant_key_files_round_trip_and_the_dev_file_names_the_dev_tenants(
    tmp_path: Path,
) -> None:
    keys = [TenantKey("demo", "secret", 2.0), TenantKey("acme", "other", 1.0)]
    assert read_tenant_keys(write_tenant_keys(tmp_path / "keys.json", keys)) == keys
    dev = {t.name: t.api_key for t in read_tenant_keys(TENANT_KEYS_DEV)}
    assert dev == {"demo": "demo-key", "acme": "acme-key"}
    (tmp_path / "empty.json").write_text('{"tenants": {}}')
    with pytest.raises(ValueError):
        read_tenant_keys(tmp_path / "empty.json")
