"""Services behind `pgbridge workload ...`, `query --pack` and the demo: where the shop connects.

The workload is the application: it logs in as the application user through the writer endpoint
(PgBouncer, then HAProxy to the primary) when the deployment has endpoints, else straight to the
instance. Analytics on the source run as the read-only user, on the same path.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgbridge.errors import DeploymentError, UsageError
from pgbridge.ops import endpoints
from pgbridge.ops import pipeline as pipeline_ops
from pgbridge.ops.context import Deployment
from pgbridge.workload import analytics
from pgbridge.workload.generator import Target, Workload, connect
from pgbridge.workload.load import LoadResult, load, loaded, sizes
from pgbridge.workload.mix import check_rate
from pgbridge.workload.stats import Recorder


def target(dep: Deployment, role: str | None = None) -> Target:
    dep.home.require()
    if not dep.supervisor.running():
        raise DeploymentError(f"deployment {dep.spec.name} is stopped", hint="run `pgbridge up` first")
    user = role or dep.spec.database.users.app
    if endpoints.enabled(dep):
        return Target(endpoints.dsn(dep, user, "writer", password=True), dep.spec.database.schema_, pooled=True)
    return Target(dep.dsn(user, password=True), dep.spec.database.schema_, pooled=False)


def _connect(t: Target) -> psycopg.Connection[Any]:
    try:
        return connect(t)
    except psycopg.OperationalError as e:
        raise DeploymentError(f"cannot connect to the deployment: {str(e).strip()}") from None


def load_catalogue(dep: Deployment, scale: float) -> LoadResult:
    """`workload load --scale S`: the schema, then the catalogue and history unless already there."""
    sizes(scale)  # bad input fails before connecting
    t = target(dep)
    with _connect(t) as conn:
        try:
            return load(conn, t.schema, scale)
        except psycopg.Error as e:
            raise DeploymentError(f"loading the catalogue failed: {str(e).strip()}") from None


def is_loaded(dep: Deployment) -> bool:
    t = target(dep)
    with _connect(t) as conn:
        try:
            return loaded(conn, t.schema)
        except psycopg.errors.UndefinedTable:
            return False
        except psycopg.Error as e:
            raise DeploymentError(f"cannot read the shop's catalogue: {str(e).strip()}") from None


def workload(
    dep: Deployment, rate: float, duration: float | None, *, workers: int = 4, seed: int | None = None
) -> Workload:
    """A workload ready to `run()` (or `start()`) against the deployment's catalogue."""
    check_rate(rate, duration, workers)
    if not is_loaded(dep):
        raise UsageError("the shop has no catalogue yet", hint="pass --scale S, or run `pgbridge workload load`")
    return Workload(target(dep), rate, workers=workers, duration=duration, seed=seed, recorder=Recorder())


# -- analytics packs --------------------------------------------------------------------------------
def run_pack(dep: Deployment, name: str, *, on: str = "warehouse") -> list[analytics.QueryResult]:
    queries = analytics.load_pack(name)
    schema = dep.spec.database.schema_
    if on == "warehouse":

        def execute(sql: str) -> tuple[list[str], list[list[Any]]]:
            r = pipeline_ops.query(dep, sql)
            return list(r["columns"]), list(r["rows"])

        return analytics.run(queries, schema, execute)
    t = target(dep, dep.spec.database.users.readonly)
    with _connect(t) as conn:

        def execute_pg(sql: str) -> tuple[list[str], list[list[Any]]]:
            try:
                cur = conn.execute(sql.encode())
                return [d.name for d in cur.description or []], [list(r) for r in cur.fetchall()]
            except psycopg.Error as e:
                raise UsageError(f"query failed: {str(e).strip()}") from None

        return analytics.run(queries, schema, execute_pg)
