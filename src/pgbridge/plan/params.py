"""Effective PostgreSQL parameters: layer platform, class and group settings, with provenance (pure).

An instance's parameters come from layers, lowest first: the server's boot values ('default'), the
settings pgbridge itself fixes ('platform'), values computed from the instance class and storage
('class'), then each named parameter group in the order the spec lists them ('group:<name>', the
last one wins). Every group value is checked against the server's own catalogue so a typo or an
out-of-range value is reported with the group's name before anything is written, and parameters
pgbridge manages itself (ssl, wal_level, ports, file paths, ...) cannot be overridden. The diff
compares desired values with the server's current ones by meaning, not spelling, and marks changes
that only take effect after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pgbridge.platform.catalogue import Catalogue, ParameterError, Scalar

SOURCE_DEFAULT = "default"
SOURCE_PLATFORM = "platform"
SOURCE_CLASS = "class"
GROUP_SOURCE_PREFIX = "group:"


@dataclass(frozen=True)
class ParamValue:
    """A parameter's effective value and the layer it comes from.

    `source` is 'default' (server boot value), 'platform' (fixed by pgbridge), 'class' (computed from
    the instance class) or 'group:<name>' (a named parameter group).
    """

    name: str
    value: str
    source: str


@dataclass(frozen=True)
class ParamChange:
    """A parameter whose desired value differs from the server's; `static` ones need a restart."""

    name: str
    old: str | None
    new: str
    static: bool


def group_source(group: str) -> str:
    return f"{GROUP_SOURCE_PREFIX}{group}"


def _layer_error(where: str, exc: ParameterError) -> ParameterError:
    """The same error (same class) with `where` in front of its message."""
    return type(exc)(f"{where}: {exc.message}", parameter=exc.parameter, value=exc.value, hint=exc.hint)


def effective_parameters(
    *,
    platform: Mapping[str, str],
    computed: Mapping[str, str],
    groups: Sequence[tuple[str, Mapping[str, Scalar]]],
    catalogue: Catalogue,
    protected: frozenset[str],
) -> dict[str, ParamValue]:
    """Merge platform < class < groups (in order) into one map keyed by the server's parameter names.

    Class and group values are validated and returned in the catalogue's canonical spelling ('1024MB'
    becomes '1GB'). Platform values are validated too when the catalogue knows the name; names it does
    not know (extension parameters such as pg_stat_statements.*) are kept as given. A group that sets
    a protected parameter, an unknown one or a bad value raises ParameterError naming the group.
    """
    protected_lower = {p.lower() for p in protected}
    merged: dict[str, ParamValue] = {}

    for name, value in platform.items():
        if name in catalogue:
            try:
                value = catalogue.validate(name, value)
            except ParameterError as exc:
                raise _layer_error("pgbridge platform setting", exc) from exc
        key = catalogue.canonical_name(name)
        merged[key] = ParamValue(key, value, SOURCE_PLATFORM)

    for name, value in computed.items():
        try:
            canonical = catalogue.validate(name, value)
        except ParameterError as exc:
            raise _layer_error("value computed for the instance class", exc) from exc
        key = catalogue.canonical_name(name)
        merged[key] = ParamValue(key, canonical, SOURCE_CLASS)

    for group, params in groups:
        where = f"parameter group '{group}'"
        for name, raw in params.items():
            if name.lower() in protected_lower:
                raise ParameterError(
                    f"{where}: {name} is managed by pgbridge and cannot be set in a parameter group",
                    parameter=name,
                    value=str(raw),
                    hint="pgbridge sets ssl, wal_level, ports, file paths and replication settings itself;"
                    " remove it from the group",
                )
            try:
                canonical = catalogue.validate(name, raw)
            except ParameterError as exc:
                raise _layer_error(where, exc) from exc
            key = catalogue.canonical_name(name)
            merged[key] = ParamValue(key, canonical, group_source(group))

    return merged


def with_defaults(params: Mapping[str, ParamValue], catalogue: Catalogue) -> dict[str, ParamValue]:
    """`params` plus every other settable parameter at its boot value (source 'default'), for display."""
    full = {
        s.name: ParamValue(s.name, s.boot_val, SOURCE_DEFAULT)
        for s in catalogue
        if s.boot_val is not None and s.context != "internal"
    }
    full.update(params)
    return dict(sorted(full.items()))


def diff_parameters(
    desired: Mapping[str, ParamValue],
    current: Mapping[str, str],
    catalogue: Catalogue,
) -> list[ParamChange]:
    """The desired parameters whose value differs from `current` (e.g. pg_settings.setting), by name.

    Values are compared by meaning ('1GB' == '131072' for shared_buffers, 'on' == 'true'). A
    parameter missing from `current` is a change from None. Parameters the catalogue does not know
    are compared as text and treated as static, since their restart needs cannot be checked.
    """
    current_lower = {k.lower(): v for k, v in current.items()}
    changes: list[ParamChange] = []
    for name in sorted(desired):
        want = desired[name]
        have = current_lower.get(name.lower())
        if have is not None and catalogue.same_value(name, have, want.value):
            continue
        static = catalogue.is_static(name) if name in catalogue else True
        changes.append(ParamChange(name=want.name, old=have, new=want.value, static=static))
    return changes
