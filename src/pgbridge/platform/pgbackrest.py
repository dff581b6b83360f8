"""pgBackRest: renders its configuration and runs its commands as the service user.

pgBackRest owns everything hard about backups (WAL archiving, block-level incremental copies,
encryption, compression, checksums, retention of WAL); pgbridge decides when and what (see
`plan/backup.py`). Rendering is pure; `PgBackRest` is the only place that runs the program, always
as the OS user that owns the data, with its lock, log and spool folders inside the deployment home.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgbridge.errors import CommandFailed, DeploymentError, PgbridgeError
from pgbridge.plan.backup import BackupSet
from pgbridge.platform import system
from pgbridge.settings import ServiceUser

ANNOTATION = "pgbridge-snapshot"


@dataclass(frozen=True)
class PgHost:
    """One local PostgreSQL member pgBackRest may back up from (it finds the primary itself)."""

    path: Path
    port: int
    socket_dir: Path


@dataclass(frozen=True)
class RepoSettings:
    kind: str  # local | s3
    path: str  # folder (local) or prefix (s3)
    cipher_pass: str | None  # None: no encryption
    compression: str
    compression_level: int | None
    archive_queue_max_mb: int
    s3_bucket: str | None = None
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_uri_style: str = "host"
    s3_verify_tls: bool = True
    s3_key: str | None = None
    s3_secret: str | None = None


@dataclass(frozen=True)
class Layout:
    """Where pgBackRest keeps its working files inside the home (all owned by the service user)."""

    root: Path  # <home>/backup

    @property
    def conf(self) -> Path:
        return self.root / "pgbackrest.conf"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots.json"

    @property
    def scheduler_conf(self) -> Path:
        return self.root / "scheduler.json"

    @property
    def scheduler_state(self) -> Path:
        return self.root / "scheduler-state.json"


def render_conf(stanza: str, layout: Layout, repo: RepoSettings, hosts: Sequence[PgHost], admin_user: str) -> str:
    """pgbackrest.conf for one deployment (it holds the cipher pass: written 0600 for the service user)."""
    g: list[tuple[str, str]] = [
        ("lock-path", str(layout.lock)),
        ("log-path", str(layout.log)),
        ("spool-path", str(layout.spool)),
        ("log-level-file", "info"),
        ("log-level-console", "warn"),
        ("log-level-stderr", "off"),
        ("process-max", "2"),
        ("start-fast", "y"),
        ("archive-async", "y"),
        # A stalled archive may hold this much WAL; past it, pgBackRest drops segments (and says so)
        # rather than letting pg_wal fill the disk under PostgreSQL.
        ("archive-push-queue-max", f"{repo.archive_queue_max_mb}MiB"),
        ("archive-get-queue-max", "256MiB"),
        ("compress-type", repo.compression),
        # pgbridge expires backups itself (plan/backup.py) so that snapshots are never expired.
        ("expire-auto", "n"),
        ("repo1-retention-full", "9999999"),
        ("repo1-retention-archive-type", "full"),
    ]
    if repo.compression_level is not None:
        g.append(("compress-level", str(repo.compression_level)))
    if repo.kind == "s3":
        g += [
            ("repo1-type", "s3"),
            ("repo1-path", repo.path or "/pgbridge"),
            ("repo1-s3-bucket", repo.s3_bucket or ""),
            ("repo1-s3-endpoint", repo.s3_endpoint or ""),
            ("repo1-s3-region", repo.s3_region),
            ("repo1-s3-uri-style", repo.s3_uri_style),
            ("repo1-s3-verify-tls", "y" if repo.s3_verify_tls else "n"),
        ]
        if repo.s3_key and repo.s3_secret:
            g += [("repo1-s3-key", repo.s3_key), ("repo1-s3-key-secret", repo.s3_secret)]
    else:
        g.append(("repo1-path", repo.path))
    if repo.cipher_pass is not None:
        g += [("repo1-cipher-type", "aes-256-cbc"), ("repo1-cipher-pass", repo.cipher_pass)]
    lines = ["# written by pgbridge: edits are overwritten by `pgbridge up`", "[global]"]
    lines += [f"{k}={v}" for k, v in g]
    lines += ["", f"[{stanza}]"]
    for i, h in enumerate(hosts, start=1):
        lines += [
            f"pg{i}-path={h.path}",
            f"pg{i}-port={h.port}",
            f"pg{i}-socket-path={h.socket_dir}",
            f"pg{i}-user={admin_user}",
        ]
    return "\n".join(lines) + "\n"


def archive_command(binary: Path | str, conf: Path, stanza: str) -> str:
    """PostgreSQL's archive_command: the same on every member, each pushing its own pg_wal.

    PostgreSQL runs it in the member's data folder, so "$PWD" names that member (pg1-path in the
    file is member 1, which may be a replica or gone).
    """
    return (
        f"{shlex.quote(str(binary))} --config={shlex.quote(str(conf))} --stanza={stanza}"
        ' --pg1-path="$PWD" archive-push %p'
    )


def _ts(value: Any) -> float:
    return float(value) if value is not None else 0.0


def parse_info(doc: Any, stanza: str, snapshots: dict[str, str]) -> tuple[list[BackupSet], dict[str, Any]]:
    """Backup sets and the archive range from `pgbackrest info --output=json`.

    `snapshots` maps snapshot names to labels; those sets carry their name.
    """
    by_label = {label: name for name, label in snapshots.items()}
    entry = next((s for s in doc if s.get("name") == stanza), None) if isinstance(doc, list) else None
    if entry is None:
        return [], {}
    sets = []
    for b in entry.get("backup", []):
        if b.get("error"):
            continue  # a backup with page checksum errors is not offered for restore
        info = b.get("info", {})
        sets.append(
            BackupSet(
                label=b["label"],
                type=b["type"],
                start=_ts(b.get("timestamp", {}).get("start")),
                stop=_ts(b.get("timestamp", {}).get("stop")),
                prior=b.get("prior"),
                size=int(info.get("size") or 0),
                repo_size=int((info.get("repository") or {}).get("delta") or 0),
                snapshot=by_label.get(b["label"]),
            )
        )
    archives = entry.get("archive", [])
    archive = archives[-1] if archives else {}
    return sets, {"status": entry.get("status", {}), "archive": archive, "cipher": entry.get("cipher")}


def target_time(ts: float) -> str:
    """A recovery_target_time PostgreSQL reads unambiguously (UTC, microseconds)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


LOCK_ACQUIRE_ERROR = 50  # pgBackRest's exit code when another of its processes holds the lock
LOCK_HELD = "Resource temporarily unavailable"  # its message for a lock another process holds (EWOULDBLOCK)
LOCK_WAIT = 60.0


class PgBackRest:
    """Runs pgBackRest for one stanza as the service user."""

    def __init__(self, binary: Path, conf: Path, stanza: str, user: ServiceUser) -> None:
        self.binary = binary
        self.conf = conf
        self.stanza = stanza
        self.user = user

    def argv(self, command: str, *options: str, stanza: bool = True, params: Sequence[str] = ()) -> list[str]:
        base = [str(self.binary), f"--config={self.conf}"]
        if stanza:
            base.append(f"--stanza={self.stanza}")
        return self.user.command([*base, *options, command, *params])

    def run(
        self,
        command: str,
        *options: str,
        what: str | None = None,
        timeout: float = 3600,
        stanza: bool = True,
        params: Sequence[str] = (),
        lock_wait: float = 0.0,
    ) -> str:
        """Run one command; with `lock_wait`, retry it that long while another pgBackRest holds its lock.

        A running PostgreSQL starts `archive-push` processes of its own at any moment (asynchronous
        ones hold the archive lock for a while), so commands that take that lock while the database
        runs wait for it rather than fail on the first try.
        """
        argv = self.argv(command, *options, stanza=stanza, params=params)
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                return system.run(argv, what=what or f"pgbackrest {command}", timeout=timeout)
            except PgbridgeError as e:
                # exit 50 also means a lock file it may not open: only a held lock is worth a wait
                locked = isinstance(e, CommandFailed) and e.returncode == LOCK_ACQUIRE_ERROR and LOCK_HELD in e.message
                if locked and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise DeploymentError(e.message, hint=f"pgBackRest's log: {self.conf.parent / 'log'}") from None

    def stanza_create(self) -> None:
        self.run("stanza-create", what="creating the backup stanza", timeout=300, lock_wait=LOCK_WAIT)

    def check(self) -> None:
        self.run("check", what="checking WAL archiving", timeout=300, lock_wait=LOCK_WAIT)

    def backup(self, kind: str, annotation: dict[str, str] | None = None) -> None:
        opts = [f"--type={kind}"]
        for k, v in (annotation or {}).items():
            opts.append(f"--annotation={k}={v}")
        self.run("backup", *opts, what=f"{kind} backup")

    def info(self) -> Any:
        out = self.run("info", "--output=json", what="reading the backup repository", timeout=300)
        try:
            return json.loads(out)
        except ValueError:
            raise DeploymentError(f"pgbackrest info returned no JSON: {out[:200]}") from None

    def expire(self, label: str | None = None, archive_retention: int | None = None) -> None:
        opts = []
        if label is not None:
            opts.append(f"--set={label}")
        if archive_retention is not None:
            opts.append(f"--repo1-retention-archive={archive_retention}")
        self.run("expire", *opts, what="expiring backups", timeout=1800)

    def restore(
        self, pg_path: Path, work: Path, *, target: str | None, set_label: str | None, immediate: bool = False
    ) -> None:
        """Restore into an empty folder; recovery settings go to its postgresql.auto.conf.

        The copy's restore_command (written by pgBackRest with these options) fetches WAL
        asynchronously with its own lock and spool folders under `work`: with the configured ones
        it would take the source's archive lock, and the source's archive-push would wait
        archive-timeout (60 s) for it, stalling WAL archiving during every drill and restore.
        """
        opts = [f"--pg1-path={pg_path}", "--archive-mode=off", f"--lock-path={work / 'lock'}",
                f"--spool-path={work / 'spool'}"]  # fmt: skip
        if set_label:
            opts.append(f"--set={set_label}")
        if immediate:
            opts += ["--type=immediate", "--target-action=promote"]
        elif target:
            opts += ["--type=time", f"--target={target}", "--target-action=promote"]
        else:
            opts.append("--type=default")
        self.run("restore", *opts, what="restoring the backup", timeout=7200)

    def archived_wal_times(self, archive_id: str) -> float | None:
        """Modification time of the newest WAL segment in the repository (works for S3 too)."""
        out = self.run(
            "repo-ls",
            "--recurse",
            "--output=json",
            what="listing the archive",
            stanza=False,
            params=[f"archive/{self.stanza}/{archive_id}"],
        )
        try:
            doc = json.loads(out)
        except ValueError:
            raise DeploymentError(f"pgbackrest repo-ls returned no JSON: {out[:200]}") from None
        times = [
            float(v.get("time", 0))
            for name, v in doc.items()
            if v.get("type") == "file" and len(Path(name).name) >= 24 and not name.endswith(".history")
        ]
        return max(times) if times else None
