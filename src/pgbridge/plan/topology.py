"""Which Patroni members a spec asks for, and how each may take part in failover (pure).

Member 1 is the instance the deployment started with. `multi_az` adds member 2, a synchronous
standby that may be promoted. Each read replica is an asynchronous member named after it; one
that may never be promoted is tagged ``nofailover`` (and then also gets no copy of the CDC slot).
No replica is ever a synchronous standby (``nosync``): the Multi-AZ standby alone carries RPO 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgbridge.spec.models import Spec

Kind = Literal["instance", "standby", "replica"]


@dataclass(frozen=True)
class MemberPlan:
    name: str
    kind: Kind
    region: str
    nofailover: bool
    nosync: bool

    def tags(self) -> dict[str, bool]:
        return {"nofailover": self.nofailover, "noloadbalance": False, "clonefrom": False, "nosync": self.nosync}


def member_name(deployment: str, suffix: str | int = 1) -> str:
    return f"{deployment}-{suffix}"


def members(spec: Spec) -> list[MemberPlan]:
    out = [MemberPlan(member_name(spec.name, 1), "instance", "primary-az", nofailover=False, nosync=False)]
    if spec.multi_az:
        out.append(MemberPlan(member_name(spec.name, 2), "standby", "standby-az", nofailover=False, nosync=False))
    for r in spec.replicas:
        out.append(MemberPlan(member_name(spec.name, r.name), "replica", r.region, not r.promotable, nosync=True))
    return out
