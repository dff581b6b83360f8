"""The home folder of one deployment: where every file lives, and the small state record.

Everything a deployment owns is under its home, so several deployments run side by side and
`destroy` removes exactly one. The state file records allocated ports and the lifecycle phase, so
an interrupted `up` can resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgbridge.errors import HostError, NotFoundError


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.enc"

    @property
    def key_file(self) -> Path:
        return self.root / "master.key"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def pgdata(self, member: str) -> Path:
        return self.data / member

    @property
    def etcd_data(self) -> Path:
        return self.data / "etcd"

    @property
    def supervisor_conf(self) -> Path:
        return self.etc / "supervisord.conf"

    @property
    def supervisor_sock(self) -> Path:
        return self.run / "supervisor.sock"

    @property
    def supervisor_pid(self) -> Path:
        return self.run / "supervisord.pid"

    @property
    def reaper_pid(self) -> Path:
        """The process supervisord runs under (see `platform.supervisor.REAPER`)."""
        return self.run / "reaper.pid"

    @property
    def socket_dir(self) -> Path:
        return self.run

    def patroni_conf(self, member: str) -> Path:
        return self.etc / f"patroni-{member}.yml"

    @property
    def events_file(self) -> Path:
        return self.logs / "events.jsonl"

    def exists(self) -> bool:
        return self.state_file.exists()

    def require(self) -> None:
        if not self.exists():
            raise NotFoundError(
                f"no deployment at {self.root}",
                hint="run `pgbridge up` first, or pass --home / the spec of an existing deployment",
            )

    def check_owner(self) -> None:
        """Refuse a home folder owned by another user: it could hold someone else's secrets."""
        if not self.root.exists():
            return
        st = self.root.stat()
        if st.st_uid != os.geteuid():
            raise HostError(
                f"home folder {self.root} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})",
                hint="use another --home, or fix the owner if this folder is really yours",
            )

    # -- state ------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise HostError(f"state file {self.state_file} is unreadable: {e}") from None

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)


def atomic_write(path: Path, text: str | bytes, *, mode: int = 0o644) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file."""
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_if_changed(path: Path, text: str, *, mode: int = 0o644) -> bool:
    """Write only when the content differs; returns True when the file changed."""
    try:
        if path.read_text() == text:
            os.chmod(path, mode)
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, text, mode=mode)
    return True
