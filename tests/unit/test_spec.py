"""The spec: defaults, validation messages (path, bad value, what is allowed), example, schema."""

from __future__ import annotations

import pytest
import yaml

from pgbridge.errors import SpecError
from pgbridge.spec.example import example_spec
from pgbridge.spec.load import json_schema, load_spec, parse_spec


def test_minimal_spec_gets_safe_defaults() -> None:
    s = parse_spec({"name": "shop"})
    assert s.tls.mode == "required" and s.tls.min_version == "TLSv1.2"
    assert s.network.listen_addresses == ["127.0.0.1"] and s.network.allowed_cidrs == ["127.0.0.1/32"]
    assert s.instance_class == "db.small" and s.storage.type == "ssd"


def test_example_is_valid_and_commented() -> None:
    text = example_spec("demo", 6000)
    s = parse_spec(yaml.safe_load(text))
    assert s.name == "demo" and s.network.port == 6000
    assert s.parameter_group == ["oltp"]
    assert text.count("#") > 10


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "Shop!"}, ["name:", '"Shop!"', "pattern"]),
        ({"name": "a", "instance_class": "db.huge"}, ["instance_class", "db.huge", "db.small"]),
        ({"name": "a", "storage": {"type": "floppy"}}, ["storage.type", "floppy", "'ssd'"]),
        ({"name": "a", "storage": {"iops": 3000}}, ["iops can only be set"]),
        ({"name": "a", "network": {"port": 80}}, ["network.port: 80", "greater than or equal to 1024"]),
        ({"name": "a", "network": {"allowed_cidrs": ["10.0.0.1/8"]}}, ["10.0.0.1/8", "host bits"]),
        ({"name": "a", "network": {"listen_addresses": ["localhost"]}}, ["localhost", "not an IP address"]),
        ({"name": "a", "network": {"listen_addresses": ["fe80::1%eth0"]}}, ["fe80::1%eth0", "not an IP address"]),
        ({"name": "a", "network": {"allowed_cidrs": ["fe80::/64%eth0"]}}, ["fe80::/64%eth0", "IPv6 scope"]),
        ({"name": "a", "tls": {"mode": "off"}}, ["tls.mode", "'required'"]),
        ({"name": "a", "parameter_group": "nope"}, ["parameter_group", "not defined"]),
        ({"name": "a", "database": {"name": "postgres"}}, ["system database"]),
        ({"name": "a", "database": {"users": {"app": "x", "readonly": "x"}}}, ["must differ"]),
        ({"name": "a", "database": {"users": {"app": "pgbridge_admin"}}}, ["reserved"]),
        ({"name": "a", "bogus": 1}, ["bogus: unknown field; allowed here: name, instance_class"]),
        ({"name": "a", "network": {"prot": 1}}, ["network.prot: unknown field; allowed here: port"]),
        ({}, ["name: required field is missing"]),
    ],
)
def test_errors_name_path_value_and_allowed(data: dict[str, object], expected: list[str]) -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec(data, "t.yaml")
    msg = str(ei.value)
    assert msg.startswith("t.yaml: invalid spec")
    for e in expected:
        assert e in msg, msg
    assert ei.value.exit_code == 2


def test_parameter_group_accepts_one_or_many() -> None:
    groups = {"a": {"work_mem": "8MB"}, "b": {"work_mem": "16MB"}}
    assert parse_spec({"name": "x", "parameter_groups": groups, "parameter_group": "a"}).parameter_group == ["a"]
    s = parse_spec({"name": "x", "parameter_groups": groups, "parameter_group": ["a", "b"]})
    assert [g for g, _ in s.group_settings()] == ["a", "b"]


def test_load_spec_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [x\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(bad)


def test_json_schema_exports_fields() -> None:
    schema = json_schema()
    assert {"name", "instance_class", "storage", "network", "tls", "database"} <= set(schema["properties"])
    assert "name" in schema["required"]


def test_pipeline_section() -> None:
    s = parse_spec({"name": "a", "database": {"schema": "shop"}, "pipeline": {}})
    assert s.pipeline is not None and s.pipeline.name == "analytics"
    assert s.pipeline_include() == ["shop.*"]
    s = parse_spec({"name": "a", "pipeline": {"tables": {"include": ["sales.order*"], "exclude": ["sales.order_tmp"]}}})
    assert s.pipeline_include() == ["sales.order*"]
    assert parse_spec({"name": "a"}).pipeline is None
    with pytest.raises(SpecError, match="schema part must be a plain name"):
        parse_spec({"name": "a", "pipeline": {"tables": {"include": ["*.orders"]}}})
    with pytest.raises(SpecError, match=r"must look like schema\.table"):
        parse_spec({"name": "a", "pipeline": {"tables": {"exclude": ["orders"]}}})
    with pytest.raises(SpecError, match=r"pipeline\.batch\.max_rows"):
        parse_spec({"name": "a", "pipeline": {"batch": {"max_rows": 1}}})
