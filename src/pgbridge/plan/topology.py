"""Which Patroni members a spec asks for, and how each may take part in failover (pure).

Member 1 is the instance the deployment started with. `multi_az` adds member 2, a synchronous
standby that may be promoted. Each read replica is an asynchronous member named after it; one
that may never be promoted is tagged ``nofailover`` (and then also gets no copy of the CDC slot).

Which member is the synchronous standby is Patroni's ``sync_priority``: members 1 and 2 (they swap
roles on every failover) rank above promotable replicas, so while the Multi-AZ pair is whole the
replicas stay asynchronous. When the pair is broken (a host lost, the primary moved to the
standby) a promotable replica stands in, so with strict synchronous replication commits go on
instead of waiting for the lost host. A replica that may never be promoted is never chosen as
synchronous standby (``sync_priority`` 0, Patroni's ``nosync``): Patroni promotes only a member it
chose, so a commit must be on one that can take over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgbridge.spec.models import Spec

Kind = Literal["instance", "standby", "replica"]
PAIR, STAND_IN = 2, 1  # sync_priority of the Multi-AZ pair and of promotable replicas


@dataclass(frozen=True)
class MemberPlan:
    name: str
    kind: Kind
    region: str
    nofailover: bool
    sync_priority: int  # 0: never a synchronous standby

    @property
    def nosync(self) -> bool:
        return self.sync_priority == 0

    def tags(self) -> dict[str, bool | int]:
        # sync_priority 0 is Patroni's nosync; its schema allows only one of the two tags
        return {
            "nofailover": self.nofailover,
            "noloadbalance": False,
            "clonefrom": False,
            "sync_priority": self.sync_priority,
        }


def member_name(deployment: str, suffix: str | int = 1) -> str:
    return f"{deployment}-{suffix}"


def members(spec: Spec) -> list[MemberPlan]:
    out = [MemberPlan(member_name(spec.name, 1), "instance", "primary-az", nofailover=False, sync_priority=PAIR)]
    if spec.multi_az:
        out.append(MemberPlan(member_name(spec.name, 2), "standby", "standby-az", nofailover=False, sync_priority=PAIR))
    for r in spec.replicas:
        stand_in = STAND_IN if r.promotable else 0
        out.append(MemberPlan(member_name(spec.name, r.name), "replica", r.region, not r.promotable, stand_in))
    return out
