"""How fast could any Python relay doing dbward's per-statement work be? A ceiling, measured.

    python bench/ceiling.py [--reps 3] [--duration 6]

Runs `pgbench -S -M simple` against direct PostgreSQL, pgbouncer, dbward, and three minimal
relays built like dbward (asyncio Protocols on uvloop, one write per received chunk) that do
only part of its work, with none of its protocol state machine (extended protocol, COPY,
pipelining, definitions, cancels, limits, errors):

- `bare`: bytes only;
- `minimal-records`: also walks each chunk's messages, and per Query builds one real
  AuditRecord (intent and outcome merged, as dbward does for a quick statement) appended to a
  real `ProcessAuditSink` (the SQLite writer child dbward uses); the statement is not
  classified (a fixed Statement);
- `minimal`: also classifies each Query with dbward's `PostgresClassifier` (libpg_query's
  normalize, the template cache) and asks `decide()`.

`minimal` is the least a relay must do per statement to check and record it; whatever it
reaches bounds what dbward's Python can reach on this machine, whatever its state machine
costs. These relays are measuring instruments, never a product mode: they authenticate nobody
and handle only the simple protocol. See bench/README.md, "Stop 11: the ceiling".
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import alternate, medians
from harness import Target, bench_env, start_dbward

from fixtures.ports import free_port

VARIANTS = ("bare", "minimal-records", "minimal")
_U32 = struct.Struct("!I").unpack_from


def minimal_relay(upstream_port: int, port: int, variant: str, audit_path: str) -> None:
    """Serve one of the minimal relays until killed."""
    import asyncio
    import hashlib

    import uvloop

    from dbward.audit.process import ProcessAuditSink
    from dbward.audit.records import AuditEvent, AuditRecord
    from dbward.core.types import (
        Identity,
        PolicyRequest,
        ProtocolPath,
        SessionContext,
        Statement,
        StatementKind,
    )
    from dbward.policy.engine import decide
    from dbward.sql.postgres import PostgresClassifier

    records = variant != "bare"
    classify = PostgresClassifier().classify if variant == "minimal" else None
    fixed = Statement(kind=StatementKind.READ, command="SELECT", text="")
    identity = Identity("bench")
    context = SessionContext("s", identity, "bench", "app", "127.0.0.1:1", "pgbench")
    # The bare relay writes no records: no writer process either.
    sink = ProcessAuditSink(audit_path, max_delay_ms=50) if records else None

    class Upstream(asyncio.Protocol):
        def __init__(self, client: Client) -> None:
            self.client = client

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            client = self.client
            if records:
                client.on_reply(data)
            client.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.transport.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.upstream: Upstream | None = None
            self.early: list[bytes] | None = []
            self.intents: list[tuple[object, ...]] = []
            self.rows: int | None = None
            self.sid = 0
            self.connecting = asyncio.ensure_future(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", upstream_port
            )
            for data in self.early or ():
                self.upstream.transport.write(data)
            self.early = None

        def data_received(self, data: bytes) -> None:
            if self.early is not None:
                self.early.append(data)
                return
            if records and data[0] == 0x51 and _U32(data, 1)[0] + 1 == len(data):
                text = data[5:-1].decode()
                statement = fixed
                if classify is not None:
                    statement = classify(text)[0]
                    if not decide(
                        PolicyRequest(context, statement, ProtocolPath.SIMPLE, time.time())
                    ).allowed:
                        return
                self.sid += 1
                self.intents.append(
                    (
                        self.sid,
                        text,
                        hashlib.sha256(data[5:-1]).hexdigest(),
                        statement,
                        time.perf_counter(),
                    )
                )
            assert self.upstream is not None
            self.upstream.transport.write(data)

        def on_reply(self, data: bytes) -> None:
            pos, size = 0, len(data)
            while pos + 5 <= size:
                msg_type = data[pos]
                end = pos + 1 + _U32(data, pos + 1)[0]
                if msg_type == 0x43:  # CommandComplete: "SELECT n"
                    tag = data[pos + 5 : end - 1]
                    self.rows = int(tag[tag.rfind(b" ") + 1 :]) if tag[:6] == b"SELECT" else None
                elif msg_type == 0x5A and self.intents:  # ReadyForQuery
                    sid, text, digest, statement, started = self.intents.pop(0)
                    assert sink is not None  # replies are walked only when recording
                    sink.append(
                        AuditRecord(
                            AuditEvent.STATEMENT,
                            int(time.time() * 1000),
                            "s",
                            "bench",
                            "127.0.0.1:1",
                            "pgbench",
                            "bench",
                            "app",
                            "simple",
                            sid,
                            text,
                            digest,
                            statement.kind.value,
                            statement.command,
                            statement.tables,
                            "allow",
                            "",
                            "",
                            "ok",
                            "",
                            self.rows,
                            round((time.perf_counter() - started) * 1000, 3),
                        )
                    )
                pos = end

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upstream is not None:
                self.upstream.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if sink is not None:
            sink.start(loop)
        server = await loop.create_server(Client, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--relay", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay:
        upstream_port, port, variant, audit_path = args.relay
        minimal_relay(int(upstream_port), int(port), variant, audit_path)
        return 0
    work = Path(tempfile.mkdtemp(prefix="dbward-ceiling-"))
    with bench_env(durabilities=()) as env:
        env.targets["dbward"] = start_dbward(env.work, env.pg, "ceiling-pw-1", "batched")
        direct = env.direct
        for variant in VARIANTS:
            port = free_port()
            audit = str(work / f"{variant}.db")
            relay = subprocess.Popen(
                [sys.executable, __file__, "--relay", str(direct.port), str(port), variant, audit]
            )
            time.sleep(1.5)
            env.targets[variant] = Target(
                variant, "127.0.0.1", port, direct.user, direct.password, process=relay
            )
        order = ["direct", "pgbouncer", *VARIANTS, "dbward"]
        print_table(alternate(env.targets, order, "simple", args.reps, args.duration), args)
    return 0


def print_table(samples: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    direct = medians(samples["direct"])[0] or 1.0
    pgbouncer = medians(samples["pgbouncer"])[0] or 1.0
    print(f"\npgbench -S -M simple, -c 8 -j 2, {args.reps} x {args.duration:g} s, medians")
    header = f"{'target':16} {'TPS':>8} {'/direct':>8} {'/pgbouncer':>11} {'loop us/txn':>16}"
    print(f"{header} {'writer':>7}")
    for name, runs in samples.items():
        tps, loop, writer, _idle = medians(runs)
        print(
            f"{name:16} {tps:8,.0f} {tps / direct:8.2f} {tps / pgbouncer:11.2f} {loop:>16} "
            f"{writer:>7}"
        )


if __name__ == "__main__":
    sys.exit(main())
