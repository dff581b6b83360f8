"""What `up` removes when a pipeline leaves the spec or is renamed: its files, never a warehouse."""

from __future__ import annotations

from pathlib import Path

from pgbridge.home import Home
from pgbridge.ops.pipeline import prune


def _files(home: Home, name: str) -> list[Path]:
    made = [
        home.etc / f"pipeline-{name}.json",
        home.etc / f"pipeline-{name}.pgpass",
        home.run / f"pipeline-{name}.status.json",
        home.run / f"pipeline-{name}.sock",
        home.run / f"pipeline-{name}.resync",
        home.root / "warehouse" / f"{name}.duckdb",
    ]
    for f in made:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    return made


def test_a_renamed_pipeline_leaves_only_its_warehouse(tmp_path: Path) -> None:
    home = Home(tmp_path)
    old, new = _files(home, "old"), _files(home, "analytics")
    other = [home.etc / "patroni-a.yml", home.run / "supervisord.sock"]
    for f in other:
        f.write_text("x")
    gone = prune(home, "analytics")
    assert sorted(gone) == sorted(old[:5])
    assert all(f.exists() for f in [*new, old[5], *other])
    assert prune(home, "analytics") == []  # nothing more the second time


def test_no_pipeline_in_the_spec_removes_every_pipeline_file(tmp_path: Path) -> None:
    home = Home(tmp_path)
    made = _files(home, "analytics")
    assert sorted(prune(home, None)) == sorted(made[:5])
    assert made[5].exists()
    assert prune(Home(tmp_path / "never-made"), None) == []  # folders that do not exist: nothing to do
