"""pg_hba rendering: the security group as ordered rules."""

from __future__ import annotations

from pgbridge.plan.hba import HbaInput, render_hba, render_ident


def test_tls_required_rules_are_ordered_and_closed() -> None:
    rules = render_hba(HbaInput(allowed_cidrs=("10.0.0.0/16", "127.0.0.1/32"), tls_required=True))
    assert rules[0].startswith("local all postgres,pgbridge_admin peer map=pgbridge")
    assert "local all all reject" in rules
    assert "hostssl all all 10.0.0.0/16 scram-sha-256" in rules
    assert "hostssl all all 127.0.0.1/32 scram-sha-256" in rules
    assert not any(r.startswith("hostnossl all all 10.") for r in rules)
    # plain text is rejected before any allow rule can match it
    assert rules.index("hostnossl all all 0.0.0.0/0 reject") < rules.index("hostssl all all 10.0.0.0/16 scram-sha-256")
    # privileged roles are rejected over TCP before the allow rules
    assert rules.index("host all postgres,pgbridge_admin 0.0.0.0/0 reject") < rules.index(
        "hostssl all all 10.0.0.0/16 scram-sha-256"
    )
    assert rules[-2:] == ["host all all 0.0.0.0/0 reject", "host all all ::/0 reject"]
    assert all("trust" not in r and " md5" not in r for r in rules)


def test_tls_preferred_allows_plain_from_allowed_networks_only() -> None:
    rules = render_hba(HbaInput(allowed_cidrs=("192.168.1.0/24",), tls_required=False))
    assert "hostnossl all all 192.168.1.0/24 scram-sha-256" in rules
    assert "hostnossl all all 0.0.0.0/0 reject" not in rules
    assert rules[-1] == "host all all ::/0 reject"


def test_no_allowed_networks_means_only_rejects_for_clients() -> None:
    rules = render_hba(HbaInput(allowed_cidrs=(), tls_required=True))
    assert not any(r.startswith("hostssl all all") for r in rules)


def test_ident_map() -> None:
    assert render_ident("postgres", "root") == [
        "pgbridge postgres postgres",
        "pgbridge root pgbridge_admin",
        "pgbridge postgres pgbridge_admin",
    ]
    assert render_ident("alice", "alice") == ["pgbridge alice postgres", "pgbridge alice pgbridge_admin"]


def test_pipeline_daemon_logs_in_on_the_loopback_only_and_before_the_tls_reject() -> None:
    rules = render_hba(HbaInput(allowed_cidrs=("10.0.0.0/16",), tls_required=True, cdc_loopback=("shop", "shop_cdc")))
    line = "host shop shop_cdc 127.0.0.1/32 scram-sha-256"
    assert [r for r in rules if "shop_cdc" in r] == [
        line,
        "host all shop_cdc 0.0.0.0/0 reject",
        "host all shop_cdc ::/0 reject",
    ]
    # ...and all of it before any rule that lets other roles in from the client networks
    assert rules.index("host all shop_cdc ::/0 reject") < rules.index("hostssl all all 10.0.0.0/16 scram-sha-256")
    assert rules.index(line) < rules.index("hostnossl all all 0.0.0.0/0 reject")
    assert rules.index("local all all reject") < rules.index(line)
    assert not any("shop_cdc" in r for r in render_ident("postgres", "root"))
    assert not any("shop_cdc" in r for r in render_hba(HbaInput(allowed_cidrs=(), tls_required=True)))
