"""A deployment as the services see it: its home, spec, state, secrets and API clients.

Front ends resolve which deployment a command is about (from --home or the spec's name) and
then call services with a `Deployment`; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pgbridge.errors import NotFoundError
from pgbridge.home import Home
from pgbridge.platform.patroni import PatroniAPI
from pgbridge.platform.postgres import AdminTarget
from pgbridge.platform.supervisor import Supervisor
from pgbridge.secrets.store import MasterKey, SecretStore
from pgbridge.settings import Settings
from pgbridge.spec.load import load_spec
from pgbridge.spec.models import Spec

REST_USER = "pgbridge"


def secret_name_for_role(role: str) -> str:
    return f"role:{role}"


REST_SECRET = "patroni:rest"


def member_name(spec_name: str, index: int = 1) -> str:
    return f"{spec_name}-{index}"


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
        return member_name(self.spec.name)

    @cached_property
    def secrets(self) -> SecretStore:
        return SecretStore.open(self.home.secrets_file, MasterKey.resolve(self.home.key_file))

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.home, self.settings.binaries.supervisord)

    def patroni(self, member: str | None = None) -> PatroniAPI:
        m = member or self.primary_member
        return PatroniAPI(self.port(f"patroni:{m}"), REST_USER, self.secrets.get(REST_SECRET).reveal())

    @property
    def admin(self) -> AdminTarget:
        return AdminTarget(self.home.socket_dir, self.spec.network.port)

    def client_host(self) -> str:
        """The address a local client should use to reach the instance."""
        for a in self.spec.network.listen_addresses:
            if a not in ("*", "0.0.0.0", "::"):
                return a
        return "127.0.0.1"

    def dsn(self, role: str, *, password: bool = False, dbname: str | None = None) -> str:
        from psycopg.conninfo import make_conninfo

        params: dict[str, str] = {
            "host": self.client_host(),
            "port": str(self.spec.network.port),
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
