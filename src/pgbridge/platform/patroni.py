"""Patroni: renders each member's configuration and talks to its REST API.

Everything cluster-wide (parameters, pg_hba, pg_ident, timing) lives in Patroni's dynamic
configuration in etcd, changed with PATCH /config, so a later standby gets the same settings. The
local file holds only what is particular to one member (ports, data folder, credentials).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pgbridge.errors import DeploymentError, TransientError
from pgbridge.home import Home
from pgbridge.plan.hba import REWIND_ROLE

# Failover timing profiles (Patroni refuses ttl < 20 and wants loop_wait + 2 * retry_timeout <= ttl;
# docs/multi-az.md says what each gives). `default` keeps a 10 s retry_timeout (a DCS or PostgreSQL
# stall that long does not demote the primary) with the shortest ttl that allows it; `fast` is the
# shortest ttl Patroni accepts. A short loop_wait matters on a host loss: with strict synchronous
# replication no commit succeeds until a standby streams again, and the returning former primary
# waits for the new primary's post-promotion checkpoint, published on its next loop.
NAMESPACE = "/pgbridge/"  # etcd: <namespace><scope>/leader, /members/<name>, /sync, ...
PROFILES: dict[str, dict[str, int]] = {
    "default": {"ttl": 23, "loop_wait": 3, "retry_timeout": 10},
    "fast": {"ttl": 20, "loop_wait": 2, "retry_timeout": 5},
}


@dataclass(frozen=True)
class MemberConfig:
    scope: str
    member: str
    rest_port: int
    pg_port: int
    listen_addresses: tuple[str, ...]
    connect_address: str
    etcd_hosts: tuple[str, ...]
    bindir: Path
    rest_user: str
    rest_password: str
    replication_password: str
    rewind_password: str
    dcs: dict[str, Any]
    tags: dict[str, bool | int]  # MemberPlan.tags()


def render_member(home: Home, cfg: MemberConfig) -> str:
    listen = ",".join("*" if a == "*" else a for a in cfg.listen_addresses)
    doc: dict[str, Any] = {
        "scope": cfg.scope,
        "namespace": NAMESPACE,
        "name": cfg.member,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": {
            "listen": f"127.0.0.1:{cfg.rest_port}",
            "connect_address": f"127.0.0.1:{cfg.rest_port}",
            "authentication": {"username": cfg.rest_user, "password": cfg.rest_password},
        },
        "etcd3": {"hosts": list(cfg.etcd_hosts)},
        "bootstrap": {
            "dcs": cfg.dcs,
            "initdb": [
                {"encoding": "UTF8"},
                {"locale": "C.UTF-8"},
                "data-checksums",
                {"auth-local": "peer"},
                {"auth-host": "scram-sha-256"},
            ],
            "post_bootstrap": str(home.etc / "post_bootstrap.sh"),
        },
        "postgresql": {
            "listen": f"{listen}:{cfg.pg_port}",
            "connect_address": f"{cfg.connect_address}:{cfg.pg_port}",
            "data_dir": str(home.pgdata(cfg.member)),
            "bin_dir": str(cfg.bindir),
            "pgpass": str(home.run / f"pgpass-{cfg.member}"),
            "use_unix_socket": True,
            "use_unix_socket_repl": False,
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {
                    "username": "pgbridge_replicator",
                    "password": cfg.replication_password,
                    "sslmode": "verify-ca",
                    "sslrootcert": str(home.tls / "ca.crt"),
                },
                # Not the superuser: pg_rewind and the copy of logical slots connect over TCP,
                # where superusers are refused; this role may only read the leader's files.
                "rewind": {
                    "username": REWIND_ROLE,
                    "password": cfg.rewind_password,
                    "sslmode": "verify-ca",
                    "sslrootcert": str(home.tls / "ca.crt"),
                },
            },
            # A new standby or replica asks for an immediate checkpoint (an I/O burst on the leader):
            # with the default spread one pg_basebackup waits most of checkpoint_timeout first.
            "basebackup": [{"checkpoint": "fast"}],
            # A former primary that cannot be rewound is re-cloned from the leader: with strict
            # synchronous replication its extra WAL was never acknowledged to any client.
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
            "parameters": {"unix_socket_directories": str(home.socket_dir)},
        },
        "tags": dict(cfg.tags),
    }
    return "# written by pgbridge: edits are overwritten by `pgbridge up`\n" + yaml.safe_dump(doc, sort_keys=False)


def post_bootstrap_script(bindir: Path, admin_role: str) -> str:
    # Patroni passes a superuser connection URL as $1; the admin role authenticates by peer
    # identity only (pg_ident), so it gets no password here.
    return f"""#!/bin/sh
# written by pgbridge: runs once, after Patroni's initdb, as the service user
set -eu
exec {bindir}/psql "$1" -X -q -v ON_ERROR_STOP=1 -c "CREATE ROLE {admin_role} LOGIN SUPERUSER"
"""


# A member's PostgreSQL serves in these GET /cluster states (a streaming replica says "streaming").
RUNNING_STATES = ("running", "streaming")


def leader_of(view: dict[str, Any]) -> str | None:
    """The member running as primary in a GET /cluster answer, if any."""
    for m in view.get("members", []):
        if m.get("role") in ("leader", "primary") and m.get("state") == "running":
            return str(m["name"])
    return None


class PatroniAPI:
    """A small client of one member's REST API (basic auth for the unsafe endpoints)."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 10) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            raise TransientError(f"Patroni REST API at {self.base} is not answering ({e})") from None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def member(self) -> dict[str, Any]:
        _, body = self._call("GET", "/patroni")
        return body if isinstance(body, dict) else {}

    def cluster(self) -> dict[str, Any]:
        _, body = self._call("GET", "/cluster")
        return body if isinstance(body, dict) else {}

    def config(self) -> dict[str, Any]:
        status, body = self._call("GET", "/config")
        if status != 200 or not isinstance(body, dict):
            raise TransientError(f"Patroni GET /config answered {status}")
        return body

    def patch_config(self, patch: dict[str, Any]) -> dict[str, Any]:
        status, body = self._call("PATCH", "/config", patch)
        if status != 200 or not isinstance(body, dict):
            raise DeploymentError(f"Patroni refused the configuration change ({status}): {body}")
        return body

    def switchover(self, leader: str, candidate: str | None) -> tuple[int, Any]:
        """POST /switchover; the answer is advisory (4.1.5 may say 503 while it still completes)."""
        body = {"leader": leader} if candidate is None else {"leader": leader, "candidate": candidate}
        return self._call("POST", "/switchover", body)

    def restart(self, busy_wait: float = 60.0) -> None:
        """Restart PostgreSQL under this member; waits up to ``busy_wait`` while Patroni finishes
        another action of its own (it reports a member that ends a switchover's demote as a running
        replica while it still refuses a restart with "demote already in progress")."""
        deadline = time.monotonic() + busy_wait
        while True:
            status, body = self._call("POST", "/restart", {})
            if status == 200:
                return
            if not (status == 503 and "in progress" in str(body) and time.monotonic() < deadline):
                raise DeploymentError(f"Patroni could not restart PostgreSQL ({status}): {body}")
            time.sleep(0.5)

    def reload(self) -> None:
        status, body = self._call("POST", "/reload", {})
        if status not in (200, 202):
            raise DeploymentError(f"Patroni could not reload ({status}): {body}")

    def wait_running(self, timeout: float, *, role: str | None = None) -> dict[str, Any]:
        """Wait until PostgreSQL is running under this member (optionally with a given role)."""
        deadline = time.monotonic() + timeout
        last: Any = "no answer"
        while time.monotonic() < deadline:
            try:
                m = self.member()
                last = m.get("state")
                if m.get("state") == "running" and (role is None or m.get("role") == role):
                    return m
            except TransientError as e:
                last = str(e)
            time.sleep(0.5)
        raise DeploymentError(f"PostgreSQL did not become ready within {timeout:.0f}s (last state: {last})")
