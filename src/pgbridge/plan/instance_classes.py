"""The instance class table: named sizes (vCPU, memory) that drive computed tuning, plus `auto`.

Like RDS classes, a class says what the instance may use, not what the host has; `auto` sizes the
instance from the host it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class InstanceClass:
    name: str
    vcpu: int
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


INSTANCE_CLASSES: dict[str, InstanceClass] = {
    c.name: c
    for c in (
        InstanceClass("db.micro", 1, 1 * GIB),
        InstanceClass("db.small", 1, 2 * GIB),
        InstanceClass("db.medium", 2, 4 * GIB),
        InstanceClass("db.large", 2, 8 * GIB),
        InstanceClass("db.xlarge", 4, 16 * GIB),
        InstanceClass("db.2xlarge", 8, 32 * GIB),
    )
}

AUTO = "auto"
CLASS_NAMES: tuple[str, ...] = (*INSTANCE_CLASSES, AUTO)


def resolve_class(name: str, host_cpus: int, host_memory_bytes: int) -> InstanceClass:
    """Return the class for `name`; `auto` takes the host's CPUs and memory."""
    if name == AUTO:
        return InstanceClass(AUTO, max(1, host_cpus), host_memory_bytes)
    return INSTANCE_CLASSES[name]
