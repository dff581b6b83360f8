"""Benchmark: Multi-AZ failover and planned switchover, per failover profile, against the goals.

Not a test. Run from the repository root as root (the servers run as the service user, postgres):

    /opt/pgbridge/venv/bin/python bench/failover.py [--profiles default,fast] [--modes kill,crash]
        [--drills 5] [--switchovers 5] [--drill-timeout 240] [--settle-timeout 120] [--stand-in]

For each failover profile it brings up one deployment through the CLI (``pgbridge up``, a spec with
``multi_az: true`` and ``failover_profile: <profile>``, no read replicas: a primary and a synchronous
standby behind the HAProxy/PgBouncer endpoints, in a temporary PGBRIDGE_HOME_BASE, on a free port) and
destroys it at the end, also after a failure or Ctrl-C (``pgbridge destroy --yes``, then the process
trees of its pid files, never by name). ``--stand-in`` adds one promotable read replica: while the
Multi-AZ pair is broken it becomes the synchronous standby, so after a host loss commits need not wait
for the lost host to come back and rejoin. On it, in this order:

  drills       ``--drills`` runs per mode of ``pgbridge drill failover --mode MODE --yes --json``, which
               writes through the writer endpoint, injures the primary and reports the RTO (longest time
               without an acknowledged write after the fault), the acknowledged commits lost (RPO), the
               writes cut mid-commit (unknown outcome) and how long the old primary took to rejoin.
               Modes: kill (the primary's host dies), crash (only the postmaster dies), hang (the host
               freezes; off by default: it has no goal of its own and behaves like kill). A drill that takes
               longer than ``--drill-timeout`` seconds, exits non-zero or does not return JSON counts as a
               failure (its log tails are printed and the logs/ folder is copied out of the deployment)
               and the run goes on. Between drills it waits (up to ``--settle-timeout`` s) for
               ``status --json`` to show one primary and one synchronous standby again.
  switchovers  ``--switchovers`` runs of ``pgbridge failover --json`` (planned: PgBouncer PAUSE, move the
               primary, RESUME), each reporting how long PgBouncer held clients (``paused_s``) and the write
               gap a client sees (``write_gap_s``: from the PAUSE to the first commit acknowledged through
               the writer endpoint after it, which waits for the synchronous standby too).

It prints, per profile and mode, RTO p50/p95/max, RPO (the sum of rpo_lost), unknown outcomes and
rejoin time, and the switchover pause and write gap p50/max, with PASS/MISS against these goals:

  host loss (kill) RTO p95      <= 30 s (profile default), <= 21 s (profile fast)
  postmaster crash RTO p95      <= 5 s (both profiles)
  RPO                           0 acknowledged commits lost, in every drill
  switchover write gap          <= 2 s (max)

and for scale the managed-service anchors: RDS Multi-AZ (instance) fails over in 60-120 s, a Multi-AZ DB
cluster in under 35 s. Percentiles are nearest-rank: with fewer than 20 drills p95 is the maximum.
Everything shares the host: other work on it skews the figures (the load average is printed).
A first ``up`` of a two-member deployment takes about two minutes; ``--drills 2 --switchovers 3`` is a
quick run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the shared rig

from rig import Rig, deployment, say

PROFILES = ("default", "fast")
MODES = ("kill", "crash", "hang")
GOAL_RTO_P95_S = {("default", "kill"): 30.0, ("fast", "kill"): 21.0, ("default", "crash"): 5.0, ("fast", "crash"): 5.0}
GOAL_PAUSE_S = 2.0
ANCHORS = "RDS Multi-AZ instance 60-120 s, RDS Multi-AZ DB cluster < 35 s"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


# -- the deployment ----------------------------------------------------------------------------------
class FailoverRig(Rig):
    """A Multi-AZ deployment: member roles, settling after a drill, and its logs for a post-mortem."""

    profile = "default"  # its failover profile, set by main()

    def pair_roles(self) -> list[str]:
        """Roles of the Multi-AZ pair (members 1 and 2), not of a stand-in replica."""
        return [m["role"] for m in self.status()["members"] if m.get("kind") in ("instance", "standby")]

    def settle(self, timeout: float) -> float | None:
        """Seconds until the pair is a primary and a synchronous standby again; None if not within ``timeout``."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
                if sorted(self.pair_roles()) == ["primary", "sync standby"]:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(2)

    def log_tails(self, lines: int = 30) -> str:
        logs = self.home / "logs"
        if not logs.is_dir():
            return "(no logs folder)"
        files = sorted((p for p in logs.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
        parts = []
        for p in files[:6]:  # the most recently written ones
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {p.relative_to(self.home)} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def keep_logs(self, label: str) -> Path | None:
        logs = self.home / "logs"
        if not logs.is_dir():
            return None
        dest = Path(tempfile.mkdtemp(prefix=f"pgbridge-bench-logs-{self.name}-{label}-", dir="/tmp"))
        shutil.copytree(logs, dest / "logs", dirs_exist_ok=True)
        return dest


# -- measuring -----------------------------------------------------------------------------------------
@dataclass
class ProfileResult:
    profile: str
    drills: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # mode -> drill JSON
    failures: dict[str, list[str]] = field(default_factory=dict)  # mode -> what went wrong
    attempts: dict[str, int] = field(default_factory=dict)  # mode -> drills tried
    pauses: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    switch_s: list[float] = field(default_factory=list)
    switch_failures: list[str] = field(default_factory=list)


def fail(rig: FailoverRig, res: ProfileResult, mode: str, what: str) -> None:
    res.failures.setdefault(mode, []).append(what)
    say(f"[{rig.profile}] drill {mode}: FAILED: {what}")
    say(rig.log_tails())
    kept = rig.keep_logs(mode)
    if kept:
        say(f"[{rig.profile}] logs copied to {kept}")


def run_drill(rig: FailoverRig, res: ProfileResult, mode: str, timeout: float) -> None:
    started = time.monotonic()
    try:
        proc = rig.run("drill", "failover", "--mode", mode, "--yes", "--json", check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(rig, res, mode, f"no result after {timeout:.0f}s (timed out)")
        return
    took = time.monotonic() - started
    if proc.returncode != 0:
        fail(rig, res, mode, f"exit {proc.returncode} after {took:.0f}s: {(proc.stderr or proc.stdout).strip()[-800:]}")
        return
    try:
        r: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        fail(rig, res, mode, f"no JSON after {took:.0f}s: {proc.stdout.strip()[-800:]}")
        return
    res.drills.setdefault(mode, []).append(r)
    say(
        f"[{rig.profile}] drill {mode}: {r['old_primary']} -> {r['new_primary']}  RTO {r['rto_s']:.2f}s"
        f"  lost {r['rpo_lost']}/{r['acked']}  unknown {r['unknown']} ({r['unknown_committed']} committed)"
        f"  rejoined {r['rejoined']} in {r['rejoined_s']}s  (drill took {took:.0f}s)"
    )
    if r["rpo_lost"] or not r["rejoined"]:
        fail(rig, res, mode, f"lost {r['rpo_lost']} acknowledged commits, rejoined={r['rejoined']}")


def bench_profile(rig: FailoverRig, args: argparse.Namespace, res: ProfileResult) -> None:
    """Fills ``res`` as it goes: an interrupted run still reports what it measured."""
    for mode in args.modes:
        for i in range(args.drills):
            res.attempts[mode] = res.attempts.get(mode, 0) + 1
            settled = rig.settle(args.settle_timeout)
            if settled is None:
                fail(rig, res, mode, f"not settled (one primary + one sync standby) within {args.settle_timeout:.0f}s")
                continue
            say(f"[{rig.profile}] drill {mode} {i + 1}/{args.drills} (settled after {settled:.0f}s) ...")
            run_drill(rig, res, mode, args.drill_timeout)
    for i in range(args.switchovers):
        if rig.settle(args.settle_timeout) is None:
            res.switch_failures.append(f"not settled within {args.settle_timeout:.0f}s")
            continue
        try:
            r = json.loads(rig.cli("failover", "--json", timeout=args.drill_timeout))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            res.switch_failures.append(str(e)[:800])
            say(f"[{rig.profile}] switchover {i + 1}: FAILED: {str(e)[:800]}")
            continue
        res.pauses.append(float(r["paused_s"]))
        if r.get("write_gap_s") is None:
            res.switch_failures.append(f"no commit through the writer endpoint after it: {r.get('warning')}")
        else:
            res.gaps.append(float(r["write_gap_s"]))
        res.switch_s.append(float(r["seconds"]))
        say(
            f"[{rig.profile}] switchover {i + 1}/{args.switchovers}: {r['old']} -> {r['new']}"
            f" in {r['seconds']:.2f}s, writes paused {r['paused_s']:.2f}s, first commit after {r.get('write_gap_s')}s"
        )


# -- report ----------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args: argparse.Namespace, results: list[ProfileResult]) -> None:
    say()
    members = "primary + synchronous standby" + (" + a promotable replica (stand-in)" if args.stand_in else "")
    say(f"pgbridge failover benchmark: Multi-AZ ({members}), {os.cpu_count()} CPUs")
    say(f"host load average (1 min) at the start {args.load_before:.2f}, at the end {os.getloadavg()[0]:.2f}")
    say(f"{args.drills} drill(s) per mode, {args.switchovers} switchover(s) per profile; anchors: {ANCHORS}")
    say()
    head = f"  {'profile':<8} {'mode':<6} {'ok':>5} {'RTO p50':>8} {'p95':>7} {'max':>7} {'RPO':>4}"
    say(head + f" {'unknown':>8} {'rejoin p50':>10} {'max':>6}")
    for res in results:
        for mode in args.modes:
            runs = res.drills.get(mode, [])
            clean = sum(1 for r in runs if not r["rpo_lost"] and r["rejoined"])
            ok = f"{clean}/{res.attempts.get(mode, 0)}"
            if not runs:
                say(f"  {res.profile:<8} {mode:<6} {ok:>5}  (no completed drill)")
                continue
            rto = [float(r["rto_s"]) for r in runs]
            rej = [float(r["rejoined_s"]) for r in runs if r["rejoined"] and r["rejoined_s"] is not None]
            lost = sum(int(r["rpo_lost"]) for r in runs)
            unknown = f"{sum(int(r['unknown']) for r in runs)}/{sum(int(r['unknown_committed']) for r in runs)}c"
            rejoin = f"{pct(rej, 50):9.1f}s {max(rej):5.1f}s" if rej else f"{'-':>10} {'-':>6}"
            say(
                f"  {res.profile:<8} {mode:<6} {ok:>5} {pct(rto, 50):7.2f}s {pct(rto, 95):6.2f}s {max(rto):6.2f}s"
                f" {lost:>4} {unknown:>8} {rejoin}"
            )
    say("  (ok: drills that reported, lost nothing and saw the old primary rejoin / drills tried;")
    say("   RTO and RPO cover every drill that reported; unknown: writes cut mid-commit / of them committed)")
    for res in results:
        if res.pauses:
            say(
                f"  {res.profile:<8} switchover: {len(res.pauses)}/{len(res.pauses) + len(res.switch_failures)} ok,"
                f" writes paused p50 {pct(res.pauses, 50):.2f}s max {max(res.pauses):.2f}s;"
                f" write gap p50 {pct(res.gaps, 50):.2f}s max {max(res.gaps):.2f}s;"
                f" switchover p50 {pct(res.switch_s, 50):.2f}s max {max(res.switch_s):.2f}s"
            )
        elif args.switchovers:
            say(f"  {res.profile:<8} switchover: no completed switchover")
    say()
    say(f"  {'goal':<44} {'value':>9} {'target':>10}  result")
    for res in results:
        for mode in args.modes:
            goal = GOAL_RTO_P95_S.get((res.profile, mode))
            runs = res.drills.get(mode, [])
            failed = len(res.failures.get(mode, []))
            label = f"{res.profile}: {mode} RTO p95"
            if goal is None:
                continue
            if not runs:
                say(f"  {label:<44} {'-':>9} {f'<= {goal:g} s':>10}  MISS (no completed drill)")
                continue
            p95 = pct([float(r["rto_s"]) for r in runs], 95)
            note = f" ({failed} failed drill(s))" if failed else ""
            say(f"  {label:<44} {p95:8.2f}s {f'<= {goal:g} s':>10}  {verdict(p95 <= goal and not failed)}{note}")
        lost = sum(int(r["rpo_lost"]) for runs in res.drills.values() for r in runs)
        say(f"  {f'{res.profile}: RPO (acknowledged commits lost)':<44} {lost:>9} {'0':>10}  {verdict(lost == 0)}")
        if res.gaps:
            worst = max(res.gaps)
            note = f" ({len(res.switch_failures)} failed)" if res.switch_failures else ""
            ok = worst <= GOAL_PAUSE_S and not res.switch_failures
            label = f"{res.profile}: switchover write gap max"
            say(f"  {label:<44} {worst:8.2f}s {'<= 2 s':>10}  {verdict(ok)}{note}")
    for res in results:
        for mode, whats in res.failures.items():
            for what in whats:
                say(f"  failure [{res.profile} {mode}]: {what.splitlines()[0][:200]}")
        for what in res.switch_failures:
            say(f"  failure [{res.profile} switchover]: {what.splitlines()[0][:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated failover profiles")
    parser.add_argument("--modes", default="kill,crash", help="comma-separated drill modes (kill, crash, hang)")
    parser.add_argument("--drills", type=int, default=5, help="drills per mode and profile")
    parser.add_argument("--switchovers", type=int, default=5, help="planned switchovers per profile")
    parser.add_argument("--drill-timeout", type=float, default=240, help="seconds before a drill counts as failed")
    parser.add_argument("--settle-timeout", type=float, default=120, help="seconds to wait for primary + standby")
    parser.add_argument("--stand-in", action="store_true", help="add a promotable replica (synchronous stand-in)")
    args = parser.parse_args()
    args.profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [p for p in args.profiles if p not in PROFILES] + [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown profile or mode: {', '.join(bad)}")
    if os.geteuid() != 0:
        parser.error("run as root: the deployment's servers run as the service user")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    args.load_before = os.getloadavg()[0]
    results: list[ProfileResult] = []
    try:
        for profile in args.profiles:
            try:
                results.append(ProfileResult(profile))
                spec = f"multi_az: true\nfailover_profile: {profile}\n"
                if args.stand_in:
                    spec += "replicas:\n  - {name: s1, region: zone-c, promotable: true}\n"
                with deployment(spec, rig_class=FailoverRig, label=profile) as rig:
                    rig.profile = profile
                    bench_profile(rig, args, results[-1])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                say(f"[{profile}] ABORTED: {str(e)[:2000]}")
    except KeyboardInterrupt:
        say("interrupted; the deployment was destroyed")
        report(args, results)
        sys.exit(130)
    report(args, results)


if __name__ == "__main__":
    main()
