"""Which members a spec asks for, and the spec rules around them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pgbridge.ops.ha import candidates, named_candidate
from pgbridge.ops.up import _primary_start_timeout
from pgbridge.plan.hba import REWIND_ROLE, HbaInput, render_hba
from pgbridge.plan.topology import members
from pgbridge.spec.models import Spec


def spec(**kw: object) -> Spec:
    return Spec.model_validate({"name": "shop", **kw})


def test_a_single_instance_has_one_member_and_no_endpoints() -> None:
    s = spec()
    assert [m.name for m in members(s)] == ["shop-1"]
    assert s.effective_endpoints() is None


def test_multi_az_adds_a_synchronous_candidate_and_only_promotable_replicas_stand_in() -> None:
    s = spec(multi_az=True, replicas=[{"name": "r1"}, {"name": "r2", "promotable": True, "region": "z-b"}])
    by_name = {m.name: m for m in members(s)}
    assert list(by_name) == ["shop-1", "shop-2", "shop-r1", "shop-r2"]
    assert by_name["shop-2"].kind == "standby" and not by_name["shop-2"].nosync and not by_name["shop-2"].nofailover
    # sync_priority 0 is Patroni's nosync, and its schema allows only one of the two tags
    assert by_name["shop-r1"].tags() == {
        "nofailover": True,
        "noloadbalance": False,
        "clonefrom": False,
        "sync_priority": 0,
    }
    assert by_name["shop-r1"].nosync and all("nosync" not in m.tags() for m in by_name.values())
    r2 = by_name["shop-r2"]
    assert not r2.nofailover and not r2.nosync and r2.region == "z-b"
    # the Multi-AZ pair (which swaps roles on failover) outranks the stand-in for synchronous standby
    assert by_name["shop-1"].sync_priority == by_name["shop-2"].sync_priority > r2.sync_priority > 0
    assert s.effective_endpoints() is not None  # more than one member: endpoints are on


@pytest.mark.parametrize(
    "bad",
    [
        {"replicas": [{"name": "r1"}, {"name": "r1"}]},
        {"replicas": [{"name": "1x"}]},
        {"failover_profile": "reckless"},
        {"endpoints": {"max_reader_lag_mb": -1}},
        {"endpoints": {"pooler": {"pool_size": 0}}},
        {"database": {"users": {"app": "pgbridge_pooler"}}},
    ],
)
def test_bad_topology_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**bad)


def test_the_rewind_role_may_log_in_over_tls_to_postgres_only() -> None:
    rules = render_hba(HbaInput(allowed_cidrs=("10.0.0.0/8",), tls_required=True, endpoint_cidrs=("127.0.0.1/32",)))
    rewind = [r for r in rules if REWIND_ROLE in r]
    assert rewind and all(r.startswith(f"hostssl postgres {REWIND_ROLE} ") for r in rewind)
    assert "hostssl all all 127.0.0.1/32 scram-sha-256" in rules  # the pooler's address
    assert rules.index(rewind[0]) < rules.index("host all all 0.0.0.0/0 reject")


def _view(*members: tuple[str, str]) -> dict[str, object]:
    return {"members": [{"name": n, "role": r, "state": "streaming"} for n, r in members]}


def test_a_switchover_to_the_synchronous_standby_does_not_name_it() -> None:
    # Patroni 4.1.5 makes the other replicas sleep 2 s when a candidate is named (the stand-in the
    # new primary's commits wait for among them); unnamed, only the synchronous standby may win.
    view = _view(("shop-1", "leader"), ("shop-2", "sync_standby"), ("shop-r1", "replica"))
    assert named_candidate(view, "shop-2") is None
    assert candidates(view, "shop-1")[0]["name"] == "shop-2"
    # any other target is named; so is any target when Patroni could pick among synchronous standbys
    assert named_candidate(view, "shop-r1") == "shop-r1"
    two = _view(("shop-1", "leader"), ("shop-2", "sync_standby"), ("shop-r1", "sync_standby"))
    assert named_candidate(two, "shop-2") == "shop-2"
    assert named_candidate(_view(("shop-1", "leader"), ("shop-2", "replica")), "shop-2") == "shop-2"
    # Patroni in maintenance mode refuses a switchover without a candidate
    assert named_candidate({**view, "pause": True}, "shop-2") == "shop-2"


@pytest.mark.parametrize(
    ("kw", "seconds"),
    [
        ({}, 300),  # a lone instance can only be restarted where it is
        ({"replicas": [{"name": "r1", "region": "b", "promotable": True}]}, 300),  # asynchronous: may lack commits
        ({"multi_az": True}, 60),  # a new primary would wait for the crashed one anyway
        ({"multi_az": True, "replicas": [{"name": "r1", "region": "b"}]}, 60),  # not promotable: no stand-in
        ({"multi_az": True, "replicas": [{"name": "r1", "region": "b", "promotable": True}]}, 0),  # a stand-in
    ],
)
def test_a_crashed_primary_is_restarted_in_place_unless_a_stand_in_keeps_commits_going(
    kw: dict[str, object], seconds: int
) -> None:
    assert _primary_start_timeout(spec(**kw)) == seconds
