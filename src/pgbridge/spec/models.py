"""The desired state of one deployment, as pure pydantic models.

The spec says what the user wants (sizes, network rules, users); how pgbridge runs on this host
(binaries, OS user, home folder) lives in `pgbridge.settings`. Later sections (replicas, multi_az,
pooler, backup, monitoring, pipeline) are added as optional fields of `Spec`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgbridge.plan.instance_classes import CLASS_NAMES

IDENT_RE = r"^[a-z_][a-z0-9_]{0,62}$"
NAME_RE = r"^[a-z][a-z0-9-]{0,39}$"

Identifier = Annotated[str, Field(pattern=IDENT_RE, description="a lower-case SQL identifier")]
ParamValue = str | int | float | bool
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Storage(_Model):
    """Storage type drives planner and I/O settings; size drives WAL sizing and disk checks."""

    type: Literal["ssd", "provisioned-iops", "hdd"] = "ssd"
    size_gb: int = Field(20, ge=1, le=65536, description="allocated storage in GiB")
    iops: int | None = Field(None, ge=1000, le=256000, description="provisioned IOPS (only for type provisioned-iops)")

    @model_validator(mode="after")
    def _iops_only_for_piops(self) -> Storage:
        if self.iops is not None and self.type != "provisioned-iops":
            raise ValueError("iops can only be set when type is 'provisioned-iops'")
        return self


class Network(_Model):
    """Where the instance listens and who may connect (the "security group")."""

    port: int = Field(5432, ge=1024, le=65535, description="PostgreSQL port")
    listen_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1"], min_length=1, description="IP addresses to listen on"
    )
    allowed_cidrs: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32"],
        description="client networks allowed to connect (everything else is rejected)",
    )

    @field_validator("listen_addresses")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        out = []
        for a in v:
            if a in ("*", "0.0.0.0", "::"):
                out.append(a)
                continue
            try:
                if "%" in a:  # PostgreSQL, PgBouncer and pg_hba take no IPv6 scope ("%eth0")
                    raise ValueError
                out.append(str(ipaddress.ip_address(a)))
            except ValueError:
                raise ValueError(f"{a!r} is not an IP address (use e.g. 127.0.0.1, 10.0.0.5, ::1 or *)") from None
        if len(set(out)) != len(out):
            raise ValueError("listen_addresses has duplicates")
        return out

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        return [normalize_cidr(c) for c in v]


def normalize_cidr(cidr: str) -> str:
    """A network as ``address/bits`` (no host bits set, no IPv6 scope), the one form that pg_hba
    and PgBouncer's hba parser both take; ValueError names the bad value."""
    try:
        if "%" in cidr:
            raise ValueError("an IPv6 scope such as %eth0 is not allowed")
        return ipaddress.ip_network(cidr, strict=True).with_prefixlen
    except ValueError as e:
        raise ValueError(f"{cidr!r} is not a network in CIDR form, e.g. 10.0.0.0/16 ({e})") from None


class TLS(_Model):
    """`required` refuses plain-text TCP connections; `preferred` allows them (not recommended)."""

    mode: Literal["required", "preferred"] = "required"
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    hostnames: list[str] = Field(default_factory=list, description="extra DNS names to put in the server certificate")

    @field_validator("hostnames")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if not re.match(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", h):
                raise ValueError(f"{h!r} is not a DNS name")
        return v


class Users(_Model):
    """Role names; pgbridge creates them with random passwords kept in the secrets store."""

    app: Identifier = "app"
    readonly: Identifier = "readonly"
    cdc: Identifier = "cdc"

    @model_validator(mode="after")
    def _distinct(self) -> Users:
        names = [self.app, self.readonly, self.cdc]
        if len(set(names)) != 3:
            raise ValueError(f"user names must differ, got {names}")
        reserved = {"postgres", "pgbridge_admin", "pgbridge_replicator", "pgbridge_rewind", "pgbridge_pooler", "public"}
        for n in names:
            if n in reserved or n.startswith("pg_"):
                raise ValueError(f"user name {n!r} is reserved")
        return self


class Database(_Model):
    """The initial database, the application's schema in it, and its users."""

    name: Identifier = "app"
    schema_: Identifier = Field("app", alias="schema", description="schema owned by the app user")
    users: Users = Field(default_factory=lambda: Users())

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _not_system(cls, v: str) -> str:
        if v in ("postgres", "template0", "template1"):
            raise ValueError(f"{v!r} is a system database; choose another name")
        return v


class PipelineTables(_Model):
    """Table mappings, like DMS's: `schema.table` globs; excluded columns never leave the source."""

    include: list[str] = Field(default_factory=list, description="globs; empty means every table of the app schema")
    exclude: list[str] = Field(default_factory=list)
    exclude_columns: dict[str, list[str]] = Field(
        default_factory=dict, description="`schema.table` glob -> column names left out"
    )

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for g in v:
            schema, dot, table = g.partition(".")
            if not dot or not schema or not table:
                raise ValueError(f"{g!r} must look like schema.table (globs allowed in the table part)")
            if any(c in schema for c in "*?["):
                raise ValueError(f"{g!r}: the schema part must be a plain name")
        return v


class PipelineBatch(_Model):
    max_rows: int = Field(50_000, ge=100, le=10_000_000, description="changes held before a warehouse commit")
    max_wait_ms: int = Field(500, ge=10, le=60_000, description="longest wait before a committed change is applied")


class Pipeline(_Model):
    """Change-data-capture from the database into the analytics warehouse (DuckDB)."""

    name: str = Field("analytics", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    tables: PipelineTables = Field(default_factory=lambda: PipelineTables())
    target: Literal["duckdb"] = "duckdb"
    batch: PipelineBatch = Field(default_factory=lambda: PipelineBatch())
    load_workers: int = Field(2, ge=1, le=16, description="parallel readers for the initial load")


class Replica(_Model):
    """An asynchronous streaming read replica (RDS "read replica")."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,19}$", description="short name; the member is <deployment>-<name>")
    region: str = Field("local", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$", description="a placement label")
    promotable: bool = Field(
        False,
        description="may become primary in a failover; with multi_az it stands in as synchronous standby while"
        " the pair is broken, without it is asynchronous and may lack the last commits",
    )


class Pooler(_Model):
    """PgBouncer in transaction mode in front of the writer and reader endpoints."""

    port: int | None = Field(None, ge=1024, le=65535, description="client port; default: allocated and recorded")
    pool_size: int = Field(20, ge=1, le=10_000, description="server connections per user on the writer")
    reader_pool_size: int | None = Field(None, ge=1, le=10_000, description="reader pool (default pool_size)")
    max_client_conn: int = Field(1000, ge=1, le=100_000)
    reserve_pool_size: int = Field(5, ge=0, le=1000)


class Endpoints(_Model):
    """HAProxy writer/reader endpoints (checked through Patroni's REST API), PgBouncer in front."""

    writer_port: int | None = Field(None, ge=1024, le=65535, description="HAProxy writer; default: allocated")
    reader_port: int | None = Field(None, ge=1024, le=65535, description="HAProxy reader; default: allocated")
    max_reader_lag_mb: int = Field(16, ge=0, le=1_000_000, description="replicas further behind leave the reader pool")
    pooler: Pooler = Field(default_factory=lambda: Pooler())


class BackupSchedule(_Model):
    """When backups run: full backups on some weekdays, a cheaper one on the other days."""

    full_days: list[Weekday] = Field(
        default_factory=lambda: list[Weekday](["sun"]), min_length=1, description="weekdays (UTC) of the full backup"
    )
    other_days: Literal["diff", "incr", "full", "none"] = Field(
        "diff", description="backup type taken in the window on the other days"
    )
    incr_every_hours: int = Field(
        0, ge=0, le=24, description="extra incremental backups through the day, this many hours apart (0: none)"
    )

    @field_validator("full_days")
    @classmethod
    def _unique_days(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"full_days has duplicates: {v}")
        return v


class BackupRepository(_Model):
    """Where backups and archived WAL go: a local folder (default: inside the home) or S3-compatible storage."""

    type: Literal["local", "s3"] = "local"
    path: str | None = Field(
        None, description="local: an absolute folder (default <home>/backup/repo); s3: the prefix in the bucket"
    )
    s3_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    s3_endpoint: str | None = Field(None, description="host[:port] of the S3-compatible service")
    s3_region: str = "us-east-1"
    s3_uri_style: Literal["host", "path"] = "host"
    s3_verify_tls: bool = True
    s3_key_env: str = Field("AWS_ACCESS_KEY_ID", pattern=r"^[A-Z_][A-Z0-9_]*$", description="environment variable")
    s3_secret_env: str = Field("AWS_SECRET_ACCESS_KEY", pattern=r"^[A-Z_][A-Z0-9_]*$")

    @model_validator(mode="after")
    def _fields_for_type(self) -> BackupRepository:
        if self.type == "s3":
            if not self.s3_bucket or not self.s3_endpoint:
                raise ValueError("an s3 repository needs s3_bucket and s3_endpoint")
        elif any(v is not None for v in (self.s3_bucket, self.s3_endpoint)):
            raise ValueError("s3_bucket and s3_endpoint are only for type: s3")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError(f"repository path must be absolute, got {self.path!r}")
        return self


class DrillCheck(_Model):
    """A query run on a restored copy by `drill restore`; it must return one row whose first column is true."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,62}$")
    sql: str = Field(min_length=1)


class RestoreDrill(_Model):
    every_days: int = Field(0, ge=0, le=366, description="run a restore drill this often (0: only by hand)")
    checks: list[DrillCheck] = Field(default_factory=list, description="user-defined check queries")


class Backup(_Model):
    """Automated encrypted backups with point-in-time restore (pgBackRest)."""

    enabled: bool = Field(True, description="WAL archiving, scheduled backups and PITR")
    retention_days: int = Field(7, ge=1, le=35, description="automated backups are kept this many days")
    window: str = Field("03:00-04:00", description="daily backup window, HH:MM-HH:MM in UTC")
    schedule: BackupSchedule = Field(default_factory=lambda: BackupSchedule())
    compression: Literal["lz4", "zst", "gz", "bz2", "none"] = "lz4"
    compression_level: int | None = Field(None, ge=0, le=19, description="default: pgBackRest's for the type")
    encryption: bool = Field(True, description="AES-256 repository encryption; the key lives in the secrets store")
    repository: BackupRepository = Field(default_factory=lambda: BackupRepository())
    archive_timeout: int = Field(
        30, ge=10, le=3600, description="seconds: the longest a commit waits to reach the archive (PITR freshness)"
    )
    archive_queue_max_mb: int = Field(
        1024, ge=64, le=1_048_576, description="WAL held back by a stalled archive before it is dropped"
    )
    archive_stalled_after: int = Field(
        120, ge=10, le=86400, description="seconds: WAL archiving failing this long raises an archive-stalled event"
    )
    drill: RestoreDrill = Field(default_factory=lambda: RestoreDrill())

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)", v)
        if not m:
            raise ValueError(f"{v!r} is not a window; use HH:MM-HH:MM (UTC), e.g. 03:00-04:00")
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3]) * 60 + int(m[4])
        if (end - start) % 1440 < 30:
            raise ValueError(f"backup window {v} is shorter than 30 minutes")
        return v

    @model_validator(mode="after")
    def _compression_level(self) -> Backup:
        limits = {"lz4": 12, "zst": 19, "gz": 9, "bz2": 9, "none": 0}
        if self.compression_level is not None and self.compression_level > limits[self.compression]:
            raise ValueError(
                f"compression_level {self.compression_level} is too high for {self.compression}"
                f" (at most {limits[self.compression]})"
            )
        return self


class Spec(_Model):
    """One deployment: a tuned, TLS-only, least-privilege PostgreSQL run by Patroni."""

    name: str = Field(pattern=NAME_RE, description="deployment name: lower-case letters, digits, '-'")
    instance_class: str = Field("db.small", description="one of " + ", ".join(CLASS_NAMES))
    storage: Storage = Field(default_factory=lambda: Storage())
    network: Network = Field(default_factory=lambda: Network())
    tls: TLS = Field(default_factory=lambda: TLS())
    parameter_groups: dict[Identifier, dict[str, ParamValue]] = Field(
        default_factory=dict, description="named sets of PostgreSQL parameters"
    )
    parameter_group: list[Identifier] = Field(
        default_factory=list, description="groups applied in order over the computed values"
    )
    database: Database = Field(default_factory=lambda: Database())
    pipeline: Pipeline | None = Field(None, description="CDC into the analytics warehouse")
    multi_az: bool = Field(False, description="a synchronous standby with automatic failover (RPO 0)")
    failover_profile: Literal["default", "fast"] = Field(
        "default", description="Patroni timing: default (ttl 23, loop 3s) or fast (ttl 20, loop 2s)"
    )
    replicas: list[Replica] = Field(default_factory=list, description="asynchronous read replicas")
    endpoints: Endpoints | None = Field(
        None, description="writer/reader endpoints and pooling; on by default with multi_az or replicas"
    )
    backup: Backup = Field(default_factory=lambda: Backup(), description="backups, WAL archiving and PITR")

    @field_validator("instance_class")
    @classmethod
    def _class(cls, v: str) -> str:
        if v not in CLASS_NAMES:
            raise ValueError(f"unknown instance class {v!r}; allowed: {', '.join(CLASS_NAMES)}")
        return v

    @field_validator("parameter_group", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _groups_exist(self) -> Spec:
        for g in self.parameter_group:
            if g not in self.parameter_groups:
                known = ", ".join(self.parameter_groups) or "none defined"
                raise ValueError(f"parameter_group {g!r} is not defined in parameter_groups ({known})")
        return self

    @model_validator(mode="after")
    def _replica_names(self) -> Spec:
        names = [r.name for r in self.replicas]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"replica names must be unique: {', '.join(dup)}")
        return self

    def effective_endpoints(self) -> Endpoints | None:
        """Endpoints run when asked for, and always once there is more than one member."""
        if self.endpoints is not None:
            return self.endpoints
        return Endpoints() if self.multi_az or self.replicas else None

    def pipeline_include(self) -> list[str]:
        if self.pipeline is None:
            return []
        return self.pipeline.tables.include or [f"{self.database.schema_}.*"]

    def group_settings(self) -> list[tuple[str, dict[str, ParamValue]]]:
        return [(g, self.parameter_groups[g]) for g in self.parameter_group]
