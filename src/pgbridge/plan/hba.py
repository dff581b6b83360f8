"""Render the "security group": listen addresses and allowed CIDRs become pg_hba rules.

Order matters (PostgreSQL takes the first matching line): local administration by peer identity,
then replication (and the pipeline daemon, on the loopback), then the allowed client networks over
TLS with SCRAM, then an explicit reject of everything else so the refusal is deliberate and
visible in pg_hba_file_rules.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN_ROLE = "pgbridge_admin"
REPLICATION_ROLE = "pgbridge_replicator"
# pg_rewind and Patroni's copy of logical slots read the leader's files through this role.
REWIND_ROLE = "pgbridge_rewind"
SUPERUSER = "postgres"
IDENT_MAP = "pgbridge"


@dataclass(frozen=True)
class HbaInput:
    allowed_cidrs: tuple[str, ...]
    tls_required: bool
    replication_cidrs: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    cdc_loopback: tuple[str, str] | None = None  # (database, role): the pipeline daemon's login
    # Where HAProxy/PgBouncer connect from (PostgreSQL sees the pooler's address; clients' own
    # networks are checked by the pooler's hba file, platform/pgbouncer.render_hba).
    endpoint_cidrs: tuple[str, ...] = ()


def render_hba(inp: HbaInput) -> list[str]:
    rules = [
        # Only the OS users named in pg_ident (the service user, the operator) may be superuser,
        # and only on the local socket.
        f"local all {SUPERUSER},{ADMIN_ROLE} peer map={IDENT_MAP}",
        f"local replication {SUPERUSER} peer map={IDENT_MAP}",
    ]
    rules += [
        "local all all reject",
        # Privileged roles never log in over the network.
        f"host all {SUPERUSER},{ADMIN_ROLE} 0.0.0.0/0 reject",
        f"host all {SUPERUSER},{ADMIN_ROLE} ::/0 reject",
    ]
    for cidr in inp.replication_cidrs:
        rules.append(f"hostssl replication {REPLICATION_ROLE} {cidr} scram-sha-256")
        rules.append(f"hostssl postgres {REWIND_ROLE} {cidr} scram-sha-256")
    if inp.cdc_loopback:
        # The pipeline daemon logs in as the CDC role over TCP on the loopback, with SCRAM and
        # without TLS, also when TLS is required of clients: its replication stream moves about a
        # third faster over TCP than over the local socket (docs/cdc.md), its own TLS would cost
        # that back, and loopback traffic never leaves the host's kernel. A logical replication
        # connection matches the database's name, not `replication`.
        # The role is the daemon's alone: it has REPLICATION, so it logs in nowhere else.
        db, role = inp.cdc_loopback
        rules.append(f"host {db} {role} 127.0.0.1/32 scram-sha-256")
        rules += [f"host all {role} 0.0.0.0/0 reject", f"host all {role} ::/0 reject"]
    if inp.tls_required:
        rules.append("hostnossl all all 0.0.0.0/0 reject")
        rules.append("hostnossl all all ::/0 reject")
    for cidr in dict.fromkeys((*inp.allowed_cidrs, *inp.endpoint_cidrs)):
        rules.append(f"hostssl all all {cidr} scram-sha-256")
        if not inp.tls_required:
            rules.append(f"hostnossl all all {cidr} scram-sha-256")
    rules.append("host all all 0.0.0.0/0 reject")
    rules.append("host all all ::/0 reject")
    return rules


def render_ident(service_user: str, operator_user: str) -> list[str]:
    lines = [f"{IDENT_MAP} {service_user} {SUPERUSER}", f"{IDENT_MAP} {operator_user} {ADMIN_ROLE}"]
    if service_user != operator_user:
        lines.append(f"{IDENT_MAP} {service_user} {ADMIN_ROLE}")
    return lines
