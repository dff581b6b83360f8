"""Tuning maths: every computed value is accepted by the real PostgreSQL 15 catalogue and scales sanely."""

from __future__ import annotations

import re

import pytest

from pgbridge.errors import SpecError
from pgbridge.plan.instance_classes import GIB, INSTANCE_CLASSES, InstanceClass, resolve_class
from pgbridge.plan.tuning import STORAGE_TYPES, StorageType, compute_class_parameters, max_connections_for
from pgbridge.platform.catalogue import Catalogue

MIB = 1024**2

SIZE_PARAMS = (
    "shared_buffers",
    "effective_cache_size",
    "maintenance_work_mem",
    "work_mem",
    "wal_buffers",
    "min_wal_size",
    "max_wal_size",
)


def compute(name: str, storage: StorageType = "ssd", gb: int = 100, iops: int | None = None) -> dict[str, str]:
    return compute_class_parameters(INSTANCE_CLASSES[name], storage_type=storage, storage_gb=gb, iops=iops)


@pytest.mark.parametrize("storage", STORAGE_TYPES)
@pytest.mark.parametrize("class_name", sorted(INSTANCE_CLASSES))
@pytest.mark.parametrize("gb", [5, 20, 500, 10_000])
def test_every_value_is_valid_for_postgresql(
    catalogue: Catalogue, class_name: str, storage: StorageType, gb: int
) -> None:
    params = compute(class_name, storage, gb)
    for name, value in params.items():
        assert catalogue.get(name).context != "internal"
        # validate raises on anything the server would refuse (type, unit, range)
        catalogue.validate(name, value)
        assert catalogue.same_value(name, value, catalogue.validate(name, value))


@pytest.mark.parametrize("class_name", sorted(INSTANCE_CLASSES))
def test_sizes_are_integers_in_postgresql_units(class_name: str) -> None:
    params = compute(class_name)
    for name in SIZE_PARAMS:
        assert re.fullmatch(r"\d+(kB|MB|GB)", params[name]), (name, params[name])


def test_db_small_ssd_20gb(catalogue: Catalogue) -> None:
    params = compute("db.small", "ssd", 20)
    assert params == {
        "shared_buffers": "512MB",
        "effective_cache_size": "1536MB",
        "maintenance_work_mem": "128MB",
        "work_mem": "4MB",
        "max_connections": "225",
        "wal_buffers": "16MB",
        "min_wal_size": "256MB",
        "max_wal_size": "1GB",
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",
        "autovacuum_max_workers": "3",
        "autovacuum_naptime": "30s",
        "autovacuum_vacuum_cost_limit": "2000",
        "autovacuum_vacuum_scale_factor": "0.05",
        "autovacuum_analyze_scale_factor": "0.02",
        "max_worker_processes": "8",
        "max_parallel_workers": "1",
        "max_parallel_workers_per_gather": "1",
        "max_parallel_maintenance_workers": "1",
        "effective_io_concurrency": "200",
        "random_page_cost": "1.1",
    }
    # 25% of 2GiB in 8kB pages, as pg_settings would report it
    assert catalogue.same_value("shared_buffers", params["shared_buffers"], "65536")


def test_db_xlarge_hdd_500gb() -> None:
    params = compute("db.xlarge", "hdd", 500)
    assert params["shared_buffers"] == "4GB"
    assert params["effective_cache_size"] == "12GB"
    assert params["maintenance_work_mem"] == "1GB"
    assert params["max_connections"] == "1802"
    assert params["work_mem"] == "4MB"
    assert params["wal_buffers"] == "16MB"
    assert params["max_wal_size"] == "16GB"
    assert params["min_wal_size"] == "4GB"
    assert params["autovacuum_max_workers"] == "3"
    assert params["autovacuum_vacuum_cost_limit"] == "200"
    assert params["max_worker_processes"] == "8"
    assert params["max_parallel_workers"] == "4"
    assert params["max_parallel_workers_per_gather"] == "2"
    assert params["max_parallel_maintenance_workers"] == "2"
    assert params["effective_io_concurrency"] == "2"
    assert params["random_page_cost"] == "4.0"


def test_memory_split_follows_the_rules() -> None:
    for cls in INSTANCE_CLASSES.values():
        params = compute(cls.name)
        assert (
            params["shared_buffers"] == f"{cls.memory_bytes // 4 // MIB}MB"
            or params["shared_buffers"] == f"{cls.memory_bytes // 4 // GIB}GB"
        )
    assert compute("db.micro")["maintenance_work_mem"] == "64MB"
    assert compute("db.micro")["wal_buffers"] == "8MB"  # shared_buffers/32 is below 16MB


def test_maintenance_work_mem_is_capped_at_2gb() -> None:
    big = InstanceClass("big", 16, 128 * GIB)
    params = compute_class_parameters(big, storage_type="ssd", storage_gb=100)
    assert params["maintenance_work_mem"] == "2GB"
    assert params["shared_buffers"] == "32GB"


def test_max_connections_formula() -> None:
    assert max_connections_for(2 * GIB) == 225  # 2147483648 // 9531392
    assert max_connections_for(16 * GIB) == 1802
    assert max_connections_for(64 * MIB) == 20  # floor
    assert max_connections_for(256 * GIB) == 5000  # RDS cap


@pytest.mark.parametrize("storage", STORAGE_TYPES)
def test_monotonic_in_memory(catalogue: Catalogue, storage: StorageType) -> None:
    memories = [m * MIB for m in (256, 512, 768, 1024, 1500, 2048, 3000, 4096, 7900, 8192, 16384, 65536)]
    previous: dict[str, float] | None = None
    for memory in memories:
        cls = InstanceClass("auto", 2, memory)
        params = compute_class_parameters(cls, storage_type=storage, storage_gb=100)
        current: dict[str, float] = {}
        for name, value in params.items():
            normalized = catalogue.normalize(name, catalogue.validate(name, value))
            if isinstance(normalized, int | float) and not isinstance(normalized, bool):
                current[name] = float(normalized)
        if previous is not None:
            for name, number in current.items():
                assert number >= previous[name], (name, memory, number, previous[name])
        previous = current


def test_wal_size_scales_with_storage(catalogue: Catalogue) -> None:
    cls = INSTANCE_CLASSES["db.large"]
    sizes = {}
    for gb in (1, 20, 30, 100, 320, 500, 5000):
        params = compute_class_parameters(cls, storage_type="ssd", storage_gb=gb)
        max_mb = catalogue.normalize("max_wal_size", params["max_wal_size"])
        min_mb = catalogue.normalize("min_wal_size", params["min_wal_size"])
        assert isinstance(max_mb, int) and isinstance(min_mb, int)
        assert 1024 <= max_mb <= 16 * 1024
        assert min_mb >= 80 and min_mb == max(80, max_mb // 4)
        sizes[gb] = params["max_wal_size"]
    assert sizes == {
        1: "1GB",
        20: "1GB",
        30: "1536MB",
        100: "5GB",
        320: "16GB",
        500: "16GB",
        5000: "16GB",
    }


def test_storage_type_drives_io_settings() -> None:
    ssd, piops, hdd = (compute("db.large", s) for s in ("ssd", "provisioned-iops", "hdd"))
    assert (ssd["random_page_cost"], ssd["effective_io_concurrency"]) == ("1.1", "200")
    assert (piops["random_page_cost"], piops["effective_io_concurrency"]) == ("1.1", "256")
    assert (hdd["random_page_cost"], hdd["effective_io_concurrency"]) == ("4.0", "2")
    assert [p["autovacuum_vacuum_cost_limit"] for p in (hdd, ssd, piops)] == ["200", "2000", "3000"]


@pytest.mark.parametrize(
    ("iops", "cost_limit", "io_concurrency"),
    [
        (None, "3000", "256"),
        (1_000, "2000", "200"),  # never below the ssd values
        (12_000, "3000", "256"),
        (24_000, "6000", "512"),
        (64_000, "10000", "1000"),  # PostgreSQL maxima
        (256_000, "10000", "1000"),
    ],
)
def test_provisioned_iops_scale(catalogue: Catalogue, iops: int | None, cost_limit: str, io_concurrency: str) -> None:
    params = compute("db.large", "provisioned-iops", 100, iops)
    assert params["autovacuum_vacuum_cost_limit"] == cost_limit
    assert params["effective_io_concurrency"] == io_concurrency
    catalogue.validate("autovacuum_vacuum_cost_limit", cost_limit)
    catalogue.validate("effective_io_concurrency", io_concurrency)


@pytest.mark.parametrize(
    ("vcpu", "av_workers", "per_gather", "worker_processes"),
    [(1, 3, 1, 8), (2, 3, 1, 8), (4, 3, 2, 8), (8, 4, 4, 8), (16, 8, 4, 16), (64, 8, 4, 64)],
)
def test_cpu_rules(vcpu: int, av_workers: int, per_gather: int, worker_processes: int) -> None:
    params = compute_class_parameters(InstanceClass("auto", vcpu, 8 * GIB), storage_type="ssd", storage_gb=50)
    assert params["autovacuum_max_workers"] == str(av_workers)
    assert params["max_parallel_workers_per_gather"] == str(per_gather)
    assert params["max_parallel_maintenance_workers"] == str(per_gather)
    assert params["max_worker_processes"] == str(worker_processes)
    assert params["max_parallel_workers"] == str(vcpu)


def test_auto_class_with_odd_host_memory_is_valid(catalogue: Catalogue) -> None:
    cls = resolve_class("auto", 3, 7 * GIB + 123_456_789)
    params = compute_class_parameters(cls, storage_type="provisioned-iops", storage_gb=77, iops=9000)
    for name, value in params.items():
        catalogue.validate(name, value)


def test_restart_bound_parameters_are_static(catalogue: Catalogue) -> None:
    params = compute("db.medium")
    static = {name for name in params if catalogue.is_static(name)}
    assert static == {
        "shared_buffers",
        "max_connections",
        "wal_buffers",
        "autovacuum_max_workers",
        "max_worker_processes",
    }


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"storage_type": "nvme", "storage_gb": 10}, "storage type"),
        ({"storage_type": "ssd", "storage_gb": 0}, "storage size"),
        ({"storage_type": "provisioned-iops", "storage_gb": 10, "iops": 0}, "iops"),
    ],
)
def test_bad_inputs_are_spec_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        compute_class_parameters(INSTANCE_CLASSES["db.small"], **kwargs)  # type: ignore[arg-type]
