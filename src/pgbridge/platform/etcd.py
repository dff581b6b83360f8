"""etcd: the distributed configuration store Patroni keeps its leader lock and config in.

One member per deployment on loopback for now; the v3 API is what Patroni's `etcd3` uses.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pgbridge.errors import DeploymentError
from pgbridge.home import Home


def etcd_command(etcd: Path, home: Home, name: str, client_port: int, peer_port: int) -> list[str]:
    member = f"{name}-etcd"
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        str(etcd),
        "--name", member,
        "--data-dir", str(home.etcd_data),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{member}={peer}",
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"pgbridge-{name}",
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", "1000",
        "--quota-backend-bytes", str(256 * 1024 * 1024),
        "--logger", "zap",
        "--log-level", "warn",
    ]  # fmt: skip


def healthy(client_port: int, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=timeout) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(client_port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(client_port):
            return
        time.sleep(0.2)
    raise DeploymentError(f"etcd on port {client_port} did not become healthy within {timeout:.0f}s")


def _kv(client_port: int, call: str, key: str, timeout: float) -> dict[str, Any]:
    """One call of etcd's v3 JSON gateway on one key (`range`, `deleterange`)."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{client_port}/v3/kv/{call}", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DeploymentError(f"etcd on port {client_port} failed {call} of {key}: {e}") from None
    return answer if isinstance(answer, dict) else {}


def delete_key(client_port: int, key: str, timeout: float = 5) -> None:
    """Delete one key (e.g. a removed Patroni member's entry)."""
    _kv(client_port, "deleterange", key, timeout)


def get_json(client_port: int, key: str, timeout: float = 5) -> Any:
    """The JSON value of one key (e.g. a Patroni member's published state); None when it is absent."""
    for kv in _kv(client_port, "range", key, timeout).get("kvs", []):
        try:
            return json.loads(base64.b64decode(kv.get("value", "")))
        except ValueError:
            raise DeploymentError(f"etcd key {key} does not hold JSON") from None
    return None
