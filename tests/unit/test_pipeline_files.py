"""What `up` removes when a pipeline leaves the spec or is renamed: its files, never a warehouse."""

from __future__ import annotations

from pathlib import Path

from pgbridge.home import Home
from pgbridge.ops.pipeline import former, prune, stop_holds


def _files(home: Home, name: str) -> list[Path]:
    """A pipeline's files; the last is its warehouse."""
    made = [
        home.etc / f"pipeline-{name}.json",
        home.etc / f"pipeline-{name}.pgpass",
        home.run / f"pipeline-{name}.status.json",
        home.run / f"pipeline-{name}.status.tmp",
        home.run / f"pipeline-{name}.sock",
        home.run / f"pipeline-{name}.resync",
        home.root / "warehouse" / f"{name}.duckdb",
    ]
    for f in made:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    return made


def _others(home: Home) -> list[Path]:
    """Files of the deployment's other parts, some named much like a pipeline's."""
    made = [
        home.supervisor_sock,
        home.patroni_conf("a"),
        home.run / "haproxy.sock",
        home.run / ".s.PGSQL.5432",
        home.etc / "pipeline-old.json.bak",
        home.etc / ".pipeline-old.json.tmp",
    ]
    for f in made:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    return made


def test_a_renamed_pipeline_leaves_only_its_warehouse(tmp_path: Path) -> None:
    home = Home(tmp_path)
    old, new, others = _files(home, "old"), _files(home, "analytics"), _others(home)
    assert former(home, "analytics") == ["old"] and former(home, None) == ["analytics", "old"]
    gone = prune(home, {"analytics"})
    assert sorted(gone) == sorted(old[:-1])
    assert not any(f.exists() for f in gone)
    assert all(f.exists() for f in [*new, old[-1], *others])
    assert prune(home, {"analytics"}) == [] and former(home, "analytics") == []  # nothing more the second time


def test_no_pipeline_in_the_spec_removes_every_pipeline_file(tmp_path: Path) -> None:
    home = Home(tmp_path)
    made, others = _files(home, "analytics"), _others(home)
    assert sorted(prune(home, {"kept"})) == sorted(made[:-1])
    assert all(f.exists() for f in [made[-1], *others])
    never = Home(tmp_path / "never-made")
    assert prune(never, set()) == [] and former(never, None) == []  # folders that do not exist: nothing to do


def test_a_pipeline_stop_holds_for_the_pipeline_it_stopped_only() -> None:
    assert stop_holds("analytics", "analytics")
    assert stop_holds(True, "analytics")  # recorded before the stop named its pipeline
    assert not stop_holds("analytics", "bi")  # renamed: the new one starts
    assert not stop_holds("analytics", None) and not stop_holds(True, None)  # no pipeline: it goes
    assert not stop_holds(None, "analytics")
