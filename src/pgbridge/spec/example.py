"""The commented example spec written by `pgbridge init`."""

from __future__ import annotations

EXAMPLE = """\
# pgbridge deployment spec. `pgbridge validate` checks it; `pgbridge schema` prints every field.
name: {name}                  # deployment name (lower-case letters, digits, '-')

# Size of the instance: db.micro, db.small, db.medium, db.large, db.xlarge, db.2xlarge, or auto
# (sized from this host). The class drives computed tuning (shared_buffers, work_mem, ...).
instance_class: db.small

storage:
  type: ssd                   # ssd | provisioned-iops | hdd  (planner and I/O settings)
  size_gb: 20                 # allocated storage; drives WAL sizing
  # iops: 10000               # only with type: provisioned-iops

network:
  port: {port}                # PostgreSQL port
  listen_addresses: [127.0.0.1]
  allowed_cidrs:              # the "security group": only these client networks may connect
    - 127.0.0.1/32

tls:
  mode: required              # required: plain-text connections are refused | preferred
  min_version: TLSv1.2
  hostnames: [localhost]      # extra DNS names for the server certificate

# Named parameter groups override the computed values; they are applied in the order listed
# under parameter_group. Names and values are checked against the server's own catalogue.
parameter_groups:
  oltp:
    log_min_duration_statement: 500ms
    idle_in_transaction_session_timeout: 5min
    statement_timeout: 0
parameter_group: [oltp]

database:
  name: shop                  # the initial database
  schema: shop                # owned by the application user
  users:
    app: shop_app             # works in its schema; no superuser, CREATEROLE or CREATEDB
    readonly: shop_ro         # reads current and future tables
    cdc: shop_cdc             # replication role for pipelines
"""


def example_spec(name: str = "shop", port: int = 5433) -> str:
    return EXAMPLE.format(name=name, port=port)
