"""A deployment as the services see it: its home, spec, state, secrets and API clients.

Front ends resolve which deployment a command is about (from --home or the spec's name) and
then call services with a `Deployment`; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pgbridge.errors import NotFoundError, TransientError
from pgbridge.home import Home
from pgbridge.plan.topology import MemberPlan, member_name, members
from pgbridge.platform.patroni import PatroniAPI, leader_of
from pgbridge.platform.postgres import AdminTarget
from pgbridge.platform.supervisor import Supervisor
from pgbridge.secrets.store import MasterKey, SecretStore
from pgbridge.settings import Settings
from pgbridge.spec.load import load_spec
from pgbridge.spec.models import Spec

REST_USER = "pgbridge"


WILDCARDS = ("*", "0.0.0.0", "::")


def listen_addresses(addresses: Sequence[str], *, loopback: bool = False) -> tuple[str, ...]:
    """Where a server of the deployment listens: the spec's addresses, and 127.0.0.1 when needed.

    pgbridge connects to the client host (:meth:`Deployment.client_host`): the first address the
    spec names, or 127.0.0.1 when it names only wildcards. ``*`` and ``0.0.0.0`` cover 127.0.0.1;
    ``::`` alone does not (PostgreSQL and PgBouncer bind it for IPv6 only), so 127.0.0.1 is added
    then, and always with ``loopback`` (HAProxy reaches the members there).
    """
    listen = tuple(addresses)
    if not loopback and any(a not in WILDCARDS for a in listen):
        return listen
    covered = {"127.0.0.1", "*", "0.0.0.0"} & set(listen)
    return listen if covered else (*listen, "127.0.0.1")


def member_listen_addresses(spec: Spec) -> tuple[str, ...]:
    """Where each member's PostgreSQL listens: behind endpoints HAProxy reaches them on 127.0.0.1,
    and the pipeline daemon does."""
    loopback = spec.effective_endpoints() is not None or spec.pipeline is not None
    return listen_addresses(spec.network.listen_addresses, loopback=loopback)


def pooler_listen_addresses(spec: Spec) -> tuple[str, ...]:
    """Where PgBouncer listens: the spec's addresses, and where pgbridge reaches its console."""
    return listen_addresses(spec.network.listen_addresses)


def secret_name_for_role(role: str) -> str:
    return f"role:{role}"


REST_SECRET = "patroni:rest"


@dataclass
class Deployment:
    settings: Settings
    home: Home
    _spec: Spec | None = field(default=None, repr=False)

    @property
    def spec(self) -> Spec:
        if self._spec is None:
            self.home.require()
            self._spec = load_spec(self.home.spec_file)
        return self._spec

    @property
    def state(self) -> dict[str, Any]:
        return self.home.read_state()

    def port(self, key: str) -> int:
        ports: dict[str, int] = self.state.get("ports", {})
        if key not in ports:
            raise NotFoundError(f"deployment at {self.home.root} has no recorded {key} port; run `pgbridge up`")
        return int(ports[key])

    @property
    def primary_member(self) -> str:
        """The member the deployment started with (the leader is `leader()`)."""
        return member_name(self.spec.name)

    @property
    def members(self) -> list[MemberPlan]:
        return members(self.spec)

    def recorded_members(self) -> list[str]:
        """Members this host runs now (those of the last `up`), which may differ from the spec."""
        ports: dict[str, int] = self.state.get("ports", {})
        found = [k.split(":", 1)[1] for k in ports if k.startswith("patroni:")]
        return found or [self.primary_member]

    def member_port(self, member: str) -> int:
        """PostgreSQL's port on a member: the spec's port for member 1, recorded ones for the rest."""
        if member == self.primary_member:
            return self.spec.network.port
        return self.port(f"postgres:{member}")

    def cluster_view(self, members: list[str] | None = None) -> dict[str, Any]:
        """GET /cluster from the first member that answers."""
        last = "no member answered"
        for m in members or self.recorded_members():
            try:
                body = self.patroni(m, timeout=3).cluster()
                if body.get("members"):
                    return body
            except TransientError as e:
                last = e.message
        raise TransientError(f"Patroni's cluster view is unavailable: {last}")

    def leader(self) -> str:
        """The member running as primary now; member 1 when none is (callers then fail clearly)."""
        try:
            return leader_of(self.cluster_view()) or self.primary_member
        except TransientError:
            return self.primary_member

    @cached_property
    def secrets(self) -> SecretStore:
        return SecretStore.open(self.home.secrets_file, MasterKey.resolve(self.home.key_file))

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.home, self.settings.binaries.supervisord)

    def patroni(self, member: str | None = None, timeout: float = 10) -> PatroniAPI:
        m = member or self.primary_member
        return PatroniAPI(self.port(f"patroni:{m}"), REST_USER, self.secrets.get(REST_SECRET).reveal(), timeout)

    @property
    def admin(self) -> AdminTarget:
        """The primary over its unix socket (member 1 unless a failover moved the leader)."""
        members = self.recorded_members()
        port = self.spec.network.port if len(members) == 1 else self.member_port(self.leader())
        return AdminTarget(self.home.socket_dir, port)

    def member_admin(self, member: str) -> AdminTarget:
        return AdminTarget(self.home.socket_dir, self.member_port(member))

    def client_host(self) -> str:
        """The address a local client should use to reach the instance."""
        for a in self.spec.network.listen_addresses:
            if a not in WILDCARDS:
                return a
        return "127.0.0.1"

    def dsn(self, role: str, *, password: bool = False, dbname: str | None = None, port: int | None = None) -> str:
        """A verify-full TLS DSN for a client: member 1 directly, or another port of the host (the pooler)."""
        from psycopg.conninfo import make_conninfo

        params: dict[str, str] = {
            "host": self.client_host(),
            "port": str(port or self.spec.network.port),
            "dbname": dbname or self.spec.database.name,
            "user": role,
            "sslmode": "verify-full" if self.spec.tls.mode == "required" else "prefer",
            "sslrootcert": str(self.home.tls / "ca.crt"),
        }
        if password:
            params["password"] = self.secrets.get(secret_name_for_role(role)).reveal()
        return make_conninfo(**params)


def resolve_home(settings: Settings, *, home: Path | None, spec: Spec | None, name: str | None = None) -> Home:
    if home is not None:
        return Home(home.absolute())
    n = spec.name if spec is not None else name
    if n is None:
        raise NotFoundError("which deployment? pass --home, --name or a spec file (-f)")
    return Home((settings.default_home_base / n).absolute())
