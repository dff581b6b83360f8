"""Computed PostgreSQL parameters for an instance class and storage type (pure, no I/O).

Like an RDS default parameter group, a class (vCPU, memory) and the storage behind it give a tuned
starting point that named parameter groups may then override. The rules of thumb are the usual ones:
memory splits follow pgtune and the PostgreSQL manual (shared_buffers 25% of memory,
effective_cache_size 75%, maintenance_work_mem memory/16 capped at 2GB), max_connections follows the
RDS formula LEAST(memory/9531392, 5000), planner and I/O settings follow the storage (random_page_cost
1.1 and high effective_io_concurrency on SSDs, 4.0 and 2 on spinning disks, as pgtune does), and
autovacuum is set for OLTP (lower scale factors, a cost limit the storage can absorb). Every value is
an integer in PostgreSQL units (kB/MB/GB, s/min) and inside PostgreSQL 15's limits.
"""

from __future__ import annotations

from typing import Literal

from pgbridge.errors import SpecError
from pgbridge.plan.instance_classes import InstanceClass
from pgbridge.types import ByteSize

StorageType = Literal["ssd", "provisioned-iops", "hdd"]
STORAGE_TYPES: tuple[StorageType, ...] = ("ssd", "provisioned-iops", "hdd")

KB = 1024
MB = 1024**2
GB = 1024**3

# RDS: max_connections = LEAST({DBInstanceClassMemory/9531392}, 5000).
RDS_CONNECTION_BYTES = 9_531_392
MAX_CONNECTIONS_CAP = 5000
MIN_CONNECTIONS = 20

# Provisioned-IOPS volumes without a figure are treated as this many IOPS; with a figure, the
# autovacuum cost limit and effective_io_concurrency scale linearly from their values at this point.
REFERENCE_PIOPS = 12_000


def _size(nbytes: int) -> str:
    """Bytes in the largest PostgreSQL unit (kB, MB, GB) that keeps an integer."""
    return ByteSize(nbytes).pg()


def _floor(nbytes: int, step: int) -> int:
    return nbytes // step * step


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def max_connections_for(memory_bytes: int) -> int:
    """RDS's formula LEAST(memory/9531392, 5000), but never fewer than 20 connections.

    RDS divides the memory left after its own reservations; pgbridge divides the class's memory, so
    a class gets a few more connections than the RDS instance of the same size.
    """
    return _clamp(memory_bytes // RDS_CONNECTION_BYTES, MIN_CONNECTIONS, MAX_CONNECTIONS_CAP)


def compute_class_parameters(
    cls: InstanceClass,
    *,
    storage_type: StorageType,
    storage_gb: int,
    iops: int | None = None,
) -> dict[str, str]:
    """PostgreSQL parameters computed from an instance class and its storage, as PostgreSQL strings."""
    if storage_type not in STORAGE_TYPES:
        raise SpecError(f"unknown storage type '{storage_type}'; use one of {', '.join(STORAGE_TYPES)}")
    if storage_gb <= 0:
        raise SpecError(f"storage size must be a positive number of GB, not {storage_gb}")
    if iops is not None and iops <= 0:
        raise SpecError(f"iops must be a positive number, not {iops}")
    if cls.vcpu < 1 or cls.memory_bytes < 64 * MB:
        raise SpecError(f"instance class '{cls.name}' is too small ({cls.vcpu} vCPU, {cls.memory_bytes} bytes)")

    memory = cls.memory_bytes
    vcpu = cls.vcpu

    # Memory: whole MB so every value prints as an integer in a PostgreSQL unit.
    shared_buffers = _floor(memory // 4, MB)
    effective_cache_size = _floor(memory * 3 // 4, MB)
    maintenance_work_mem = min(_floor(memory // 16, MB), 2 * GB)
    max_connections = max_connections_for(memory)
    # Each connection may run a few sorts/hashes at once: share what shared_buffers leaves over
    # max_connections * 3 of them, never below PostgreSQL's own 4MB default.
    work_mem = max(4 * MB, _floor((memory - shared_buffers) // (max_connections * 3), MB))
    # PostgreSQL's own auto-tuning (wal_buffers=-1): shared_buffers/32, at most one 16MB segment.
    wal_buffers = max(64 * KB, _floor(min(16 * MB, shared_buffers // 32), 8 * KB))

    # WAL: let roughly 5% of the volume absorb WAL between checkpoints (1GB .. 16GB).
    max_wal_size = _clamp(_floor(storage_gb * GB // 20, MB), 1 * GB, 16 * GB)
    min_wal_size = max(80 * MB, _floor(max_wal_size // 4, MB))

    scale = (iops or REFERENCE_PIOPS) / REFERENCE_PIOPS
    cost_limit: int
    io_concurrency: int
    random_page_cost: str
    if storage_type == "hdd":
        cost_limit, io_concurrency, random_page_cost = 200, 2, "4.0"
    elif storage_type == "ssd":
        cost_limit, io_concurrency, random_page_cost = 2000, 200, "1.1"
    else:
        cost_limit = _clamp(round(3000 * scale), 2000, 10_000)
        io_concurrency = _clamp(round(256 * scale), 200, 1000)
        random_page_cost = "1.1"

    parallel_per_task = max(1, min(4, vcpu // 2))

    return {
        "shared_buffers": _size(shared_buffers),
        "effective_cache_size": _size(effective_cache_size),
        "maintenance_work_mem": _size(maintenance_work_mem),
        "work_mem": _size(work_mem),
        "max_connections": str(max_connections),
        "wal_buffers": _size(wal_buffers),
        "min_wal_size": _size(min_wal_size),
        "max_wal_size": _size(max_wal_size),
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",
        "autovacuum_max_workers": str(min(8, max(3, vcpu // 2))),
        "autovacuum_naptime": "30s",
        "autovacuum_vacuum_cost_limit": str(cost_limit),
        "autovacuum_vacuum_scale_factor": "0.05",
        "autovacuum_analyze_scale_factor": "0.02",
        "max_worker_processes": str(max(8, vcpu)),
        "max_parallel_workers": str(min(vcpu, 1024)),  # PostgreSQL's maximum
        "max_parallel_workers_per_gather": str(parallel_per_task),
        "max_parallel_maintenance_workers": str(parallel_per_task),
        "effective_io_concurrency": str(io_concurrency),
        "random_page_cost": random_page_cost,
    }
