"""Fleet server throughput: simulated devices publish detections to a real Mosquitto; 1 or 2
``edge-retrieval server`` processes store them in SQLite or PostgreSQL.

The fleet is simulated by ONE MQTT connection publishing for many device ids (each event on its
own device's topic, ``edge-retrieval/v1/devices/<id>/detections``, QoS 1, as a device's outbox
sends it), paced to ``devices x rate`` events per second. Servers with ``--share GROUP`` split the
stream through MQTT 5 shared subscriptions. Measured: events stored per second (distinct
event ids over the wall time until the last one is stored, backlog drained), how many were
stored more than once (rows, must be 0), events never stored (``lost``: still missing 30 s after
the last progress), and end-to-end latency p50/p99 (publish time in the event's
``time`` -> the server's ``received`` column, both UTC to the millisecond). Optional: one server is
killed (SIGKILL) mid-run and restarted with its client id, as systemd would.
Run by hand (``edge-retrieval bench --server`` or ``python -m edge_retrieval.benchmarks.server_bench``);
prints a table and writes JSON. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol import Event, detections_topic, new_event_id, utcnow


@dataclass
class Published:
    """What the simulated fleet sent."""

    ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unacked: int = 0


def publish_fleet(broker_url: str, devices: int, rate_hz: float, seconds: float,
                  at: Callable[[float], None] | None = None, duplicates: int = 0) -> Published:
    """``devices`` ids x ``rate_hz`` events/s for ``seconds`` over one connection; ``at(elapsed)`` is
    called about every 0.1 s (to kill a server mid-run); the first ``duplicates`` events are sent
    twice (a redelivery the server must store once). Waits for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from ..protocol import parse_broker_url

    addr = parse_broker_url(broker_url)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-sim-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(addr.host, addr.port, keepalive=30)
    c.loop_start()
    out = Published()
    infos = []
    names = [f"sim-{i:05d}" for i in range(devices)]
    total = int(devices * rate_hz * seconds)
    t0 = time.monotonic()
    tick = t0
    for k in range(total):
        due = t0 + k / (devices * rate_hz)
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if at is not None and now - tick >= 0.1:
            at(now - t0)
            tick = now
        dev = names[k % devices]
        ev = Event(event_id=new_event_id(), device=dev, query_id="q1", query="chainsaw", score=0.9, start_s=0.0,
                   end_s=1.0, time=utcnow(), clock="synced", source="sim", final=True)
        payload = ev.to_json()
        infos.append(c.publish(detections_topic(dev), payload, qos=1))
        if k < duplicates:
            infos.append(c.publish(detections_topic(dev), payload, qos=1))
        out.ids.append(ev.event_id)
    out.seconds = time.monotonic() - t0
    for info in infos:
        try:
            info.wait_for_publish(timeout=30)
        except (RuntimeError, ValueError):
            pass
    out.unacked = sum(not i.is_published() for i in infos)
    c.disconnect()
    c.loop_stop()
    return out


def stored(db: str) -> tuple[int, int, list[tuple[str, str]]]:
    """(rows, distinct event ids, [(time, received)]) of the detections table."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as con:
            rows, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM detections").fetchone()
            times = con.execute("SELECT time, received FROM detections").fetchall()
    else:
        con = sqlite3.connect(db, timeout=30)
        try:
            rows, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM detections").fetchone()
            times = con.execute("SELECT time, received FROM detections").fetchall()
        finally:
            con.close()
    return int(rows), int(distinct), times


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class ServerProcs:
    """``n`` server processes (``--share GROUP`` when n > 1), each with its own client id."""

    def __init__(self, n: int, broker_url: str, db: str, workdir: Path, group: str = "fleet") -> None:
        self.broker_url, self.db, self.dir, self.group = broker_url, db, workdir, group
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.share = n > 1 or db.startswith("postgresql://")
        for i in range(n):
            self.start(f"srv-{i}")

    def start(self, cid: str) -> None:
        cmd = [sys.executable, "-m", "edge_retrieval.cli", "server", "--broker", self.broker_url, "--db", self.db,
               "--client-id", cid, "--clips-dir", str(self.dir / "clips")]
        if self.share:
            cmd += ["--share", self.group]
        log = open(self.dir / f"{cid}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.procs[cid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every server printed its start line (connected and subscribed soon after)."""
        end = time.monotonic() + timeout_s
        for cid in self.procs:
            while ", database " not in (self.dir / f"{cid}.log").read_text(errors="replace"):  # the start line
                if time.monotonic() > end or self.procs[cid].poll() is not None:
                    raise RuntimeError(f"server {cid} did not start: {(self.dir / f'{cid}.log').read_text()}")
                time.sleep(0.1)
        time.sleep(1.5)  # subscriptions are sent right after CONNACK

    def kill(self, cid: str) -> None:
        self.procs[cid].send_signal(signal.SIGKILL)
        self.procs[cid].wait()

    def stop(self) -> dict[str, str]:
        """SIGTERM all; returns each one's last line (its counts)."""
        out = {}
        for cid, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
            lines = (self.dir / f"{cid}.log").read_text(errors="replace").strip().splitlines()
            out[cid] = lines[-1] if lines else ""
        return out


def run_case(broker_url: str, db: str, workdir: Path, servers: int, devices: int, rate_hz: float, seconds: float,
             kill_at_s: float | None = None, restart_after_s: float = 2.0, duplicates: int = 0,
             settle_s: float = 900.0) -> dict[str, Any]:
    """One measurement (module doc)."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs = ServerProcs(servers, broker_url, db, workdir)
    killed: dict[str, float] = {}
    try:
        procs.wait_ready()

        def at(elapsed: float) -> None:
            if kill_at_s is not None and "t" not in killed and elapsed >= kill_at_s:
                procs.kill("srv-1")
                killed["t"] = elapsed
            elif "t" in killed and "restarted" not in killed and elapsed >= killed["t"] + restart_after_s:
                procs.start("srv-1")
                killed["restarted"] = elapsed

        t0 = time.monotonic()
        pub = publish_fleet(broker_url, devices, rate_hz, seconds, at=at, duplicates=duplicates)
        if "t" in killed and "restarted" not in killed:
            procs.start("srv-1")
        want = len(pub.ids)
        # drain the backlog: until all are stored, nothing new for 30 s, or ``settle_s`` passes
        end = time.monotonic() + settle_s
        last, last_t = -1, time.monotonic()
        while time.monotonic() < end and time.monotonic() - last_t < 30.0:
            rows, distinct, _ = stored(db)
            if distinct >= want:
                break
            if distinct != last:
                last, last_t = distinct, time.monotonic()
            time.sleep(0.5)
        wall = time.monotonic() - t0
        rows, distinct, times = stored(db)
    finally:
        lines = procs.stop()
    lat = np.asarray([_epoch(r) - _epoch(t) for t, r in times]) * 1000 if times else np.zeros(1)
    return {
        "servers": servers, "db": "postgresql" if db.startswith("postgresql://") else "sqlite",
        "devices": devices, "rate_hz_per_device": rate_hz, "seconds": seconds, "published": want,
        "duplicates_sent": duplicates, "unacked_by_broker": pub.unacked,
        "stored_rows": rows, "stored_distinct": distinct, "lost": want - distinct, "stored_twice": rows - distinct,
        "events_per_s": round(distinct / wall, 1), "publish_s": round(pub.seconds, 1), "wall_s": round(wall, 1),
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "killed_at_s": killed.get("t"), "restarted_at_s": killed.get("restarted"), "server_lines": lines,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None, help="mqtt://host:port of a running Mosquitto 2 (MQTT 5)")
    p.add_argument("--postgres", default=None, help="postgresql://user@host:port (a database per case is created)")
    p.add_argument("--server-work", type=Path, default=Path("/tmp/edge-retrieval-server-bench"))
    p.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    p.add_argument("--rate", type=float, default=1.0, help="events per second per device (default 1)")
    p.add_argument("--seconds", type=float, default=60.0, help="publishing time per case (default 60)")
    p.add_argument("--servers", default="1,2", help="server process counts (default 1,2)")
    p.add_argument("--dbs", default="sqlite,postgresql", help="stores (default sqlite,postgresql)")
    p.add_argument("--kill-at", type=float, default=None, help="SIGKILL server srv-1 this many seconds in (n > 1)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (store, server count) case; the results object."""
    from ..errors import ConfigError
    from .board import board_info

    if not args.broker:
        raise ConfigError("--server needs --broker mqtt://host:port (a running Mosquitto 2)")
    results: dict[str, Any] = {"schema": 1, "part": "server",
                               "board": board_info(getattr(args, "board", None) or "unnamed", getattr(args, "note", None)),
                               "started": utcnow(), "cases": []}
    for dbk in args.dbs.split(","):
        for n in (int(x) for x in args.servers.split(",")):
            tag = f"{dbk}-{n}-{int(time.time())}"
            if dbk == "postgresql":
                if not args.postgres:
                    continue
                import psycopg

                name = "bench_" + tag.replace("-", "_")
                with psycopg.connect(args.postgres + "/postgres", autocommit=True) as con:
                    con.execute(f"CREATE DATABASE {name}")
                db = f"{args.postgres}/{name}"
            else:
                db = str(args.server_work / tag / "server.sqlite")
            r = run_case(args.broker, db, args.server_work / tag, n, args.devices, args.rate, args.seconds,
                         kill_at_s=args.kill_at if n > 1 else None)
            print(json.dumps({k: v for k, v in r.items() if k != "server_lines"}), file=sys.stderr, flush=True)
            results["cases"].append(r)
    results["finished"] = utcnow()
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"{'store':>10} {'servers':>7} {'published':>9} {'lost':>5} {'twice':>5} {'events/s':>9} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'killed':>6}"]
    for r in results["cases"]:
        lines.append(f"{r['db']:>10} {r['servers']:>7} {r['published']:>9} {r['lost']:>5} {r['stored_twice']:>5} "
                     f"{r['events_per_s']:>9.1f} {r['latency_p50_ms']:>8.1f} {r['latency_p99_ms']:>8.1f} "
                     f"{'yes' if r['killed_at_s'] is not None else 'no':>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .report import standalone_main

    return standalone_main("server_bench", __doc__.splitlines()[0], add_arguments, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
