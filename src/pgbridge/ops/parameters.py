"""The parameters a deployment should run with: platform settings, class tuning, groups.

Pure apart from the catalogue passed in; `up`, `params` and `status` all call `desired_parameters`
so they agree on every value and its source.
"""

from __future__ import annotations

import os

from pgbridge.home import Home
from pgbridge.ops.backup import archive_parameters
from pgbridge.plan.instance_classes import resolve_class
from pgbridge.plan.params import ParamValue, effective_parameters
from pgbridge.plan.tuning import compute_class_parameters
from pgbridge.platform.catalogue import Catalogue
from pgbridge.spec.models import Spec

# Parameter groups may not touch these: pgbridge (or Patroni) owns them.
PROTECTED = frozenset(
    {
        "ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_crl_file", "ssl_min_protocol_version",
        "ssl_max_protocol_version", "ssl_passphrase_command", "wal_level", "listen_addresses", "port",
        "unix_socket_directories", "unix_socket_permissions", "hba_file", "ident_file", "data_directory",
        "config_file", "external_pid_file", "archive_mode", "archive_command", "restore_command",
        "password_encryption", "max_wal_senders", "max_replication_slots", "hot_standby", "wal_log_hints",
        "logging_collector", "log_directory", "shared_preload_libraries", "primary_conninfo",
        "primary_slot_name", "synchronous_standby_names", "cluster_name",
    }
)  # fmt: skip


def platform_parameters(spec: Spec, home: Home) -> dict[str, str]:
    tls = home.tls
    return {
        "ssl": "on",
        "ssl_cert_file": str(tls / "server.crt"),
        "ssl_key_file": str(tls / "server.key"),
        "ssl_ca_file": str(tls / "ca.crt"),
        "ssl_min_protocol_version": spec.tls.min_version,
        "password_encryption": "scram-sha-256",
        "wal_level": "logical",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "hot_standby": "on",
        "wal_log_hints": "on",
        # A standby whose primary went away (a crash restarted in place, a switchover) tries to
        # stream again after this long (PostgreSQL's 5 s); commits wait for it meanwhile.
        "wal_retrieve_retry_interval": "1s",
        "wal_compression": "lz4",
        "logging_collector": "on",
        "log_directory": str(home.logs / "postgresql"),
        "log_filename": "postgresql-%a.log",
        "log_truncate_on_rotation": "on",
        "log_rotation_age": "1d",
        "log_rotation_size": "0",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "log_checkpoints": "on",
        "log_lock_waits": "on",
        "log_temp_files": "0",
        "log_autovacuum_min_duration": "10s",
        "shared_preload_libraries": "pg_stat_statements",
        "track_io_timing": "on",
        "cluster_name": spec.name,
        **archive_parameters(spec, home),
    }


def host_resources() -> tuple[int, int]:
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return cpus, mem


def desired_parameters(spec: Spec, home: Home, catalogue: Catalogue) -> dict[str, ParamValue]:
    cpus, mem = host_resources()
    cls = resolve_class(spec.instance_class, cpus, mem)
    computed = compute_class_parameters(
        cls, storage_type=spec.storage.type, storage_gb=spec.storage.size_gb, iops=spec.storage.iops
    )
    return effective_parameters(
        platform=platform_parameters(spec, home),
        computed=computed,
        groups=spec.group_settings(),
        catalogue=catalogue,
        protected=PROTECTED,
    )
