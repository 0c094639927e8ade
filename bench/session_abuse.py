"""Attack round: can one authenticated client hurt the proxy or the other sessions?

    PYTHONPATH=src python bench/session_abuse.py [--only NAME ...] [--seconds 10] [--keep]

Starts a throwaway PostgreSQL 15 and one `dbward serve` (strict audit; soak.py's environment),
then runs each attack below from an authenticated client, one at a time, while a well-behaved
psycopg client runs `SELECT 1` every 50 ms. For each attack it prints the prober's worst and
median latency during the attack, dbward's RSS (from /proc: before, peak, after the attacker
left) and the CPU seconds dbward used, whether dbward survived, what the attacker was told, and
the audit of the attacker's session (intent records, and those with no outcome once it ended).

Attacks (names for --only):
  slow_rows     SELECT repeat('x', 1000) FROM generate_series(1, 2000000), then read 1 KB/s
  slow_copy     COPY (the same) TO STDOUT, then read nothing
  notify_flood  LISTEN, never read, while another session NOTIFYs 7 KB payloads
  notice_flood  DO block raising 1 KB notices in a loop, never read
  prepared      100,000 named statements (63-character names), replies read as they come
  big_prepared  40 named statements of 1 MB text each
  pipeline      1,000,000 Parse/Bind/Execute without Sync, never read
  pipeline_flush  the same with a Flush after each, never read
  costly_sql    deep parentheses, 100k IN list, 10k UNIONs, 16 MB of "SELECT 1;", 64 KB of "/*",
                16 MB of "+", 1 MB DO body, deeply nested DO blocks (each answered in turn)
  pool_hog      three sessions keep the classifier worker busy (16 MB IN lists) while
                another sends 100 KB statements (classified in the same worker)
  cache_churn   50,000 distinct statement templates as fast as the session gets answers
  copy_big_row  COPY FROM STDIN of one 200 MB row in 64 KB CopyData messages
  copy_one_msg  COPY FROM STDIN of one 200 MB CopyData message
  copy_empty    COPY FROM STDIN: 200,000 CopyData messages of length 0, then CopyDone
  copy_no_done  COPY FROM STDIN: some data, then CopyDone never sent (the attacker idles)
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from soak import SoakEnv, _login, _read_msg, _reset, start_env, stop_env  # noqa: E402

from dbward.wire.postgres import messages as m  # noqa: E402

# ---------------------------------------------------------------------- measuring


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    prober_errors: list[str] = field(default_factory=list)


class Watch:
    """The prober (SELECT 1 every 50 ms) and the RSS sampler, recording into the current window."""

    def __init__(self, env: SoakEnv) -> None:
        self.env = env
        self.window = Window()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._probe, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _probe(self) -> None:
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        while not self.stop.is_set():
            began = time.perf_counter()
            try:
                if conn is None:
                    conn = psycopg.connect(**self.env.conninfo(application_name="prober"))
                    conn.autocommit = True
                    began = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                self.window.latencies.append(time.perf_counter() - began)
            except psycopg.Error as exc:
                self.window.prober_errors.append(str(exc).strip()[:120])
                conn = None
            time.sleep(0.05)

    def _sample(self) -> None:
        pid = self.env.process.pid
        while not self.stop.is_set():
            try:
                self.window.rss.append(rss_mb(pid))
            except OSError:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


# ---------------------------------------------------------------------- attacker helpers


class Attacker:
    """A raw-protocol client logged in through dbward (application_name = the attack)."""

    def __init__(self, env: SoakEnv, app: str) -> None:
        self.sock, _, _ = _login(env, app)
        self.said: list[str] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until_ready(self, timeout: float = 120) -> list[str]:
        """Messages up to ReadyForQuery; errors and notices as 'E 54000 text'."""
        self.sock.settimeout(timeout)
        seen: list[str] = []
        while True:
            kind, payload = _read_msg(self.sock)
            if kind in (b"E", b"N"):
                fields = m.parse_error_fields(payload)
                seen.append(f"{kind.decode()} {fields.get('C')} {fields.get('M', '')[:90]}")
            if kind == b"Z":
                return seen

    def drain(self, seconds: float) -> int:
        """Read whatever comes for `seconds`; bytes read."""
        self.sock.settimeout(0.2)
        total = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            total += len(chunk)
        return total

    def close(self) -> None:
        # A thread blocked in sendall on this socket keeps the kernel's socket open after a
        # close (no FIN, no RST: dbward would never hear the client leave): shut it first.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        _reset(self.sock)


def _send_background(attacker: Attacker, data: Callable[[], bytes], count: int) -> threading.Thread:
    """Send `count` chunks from `data()` in a thread (the socket blocks once dbward stops
    reading); errors end it quietly."""

    def run() -> None:
        try:
            for _ in range(count):
                attacker.sock.sendall(data())
        except OSError:
            pass

    attacker.sock.settimeout(None)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------- attacks


def slow_rows(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "slow_rows")
    a.send(m.query("SELECT repeat('x', 1000) FROM generate_series(1, 2000000)"))
    a.sock.settimeout(1.0)
    got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got += len(a.sock.recv(1024))
        time.sleep(1.0)
    a.close()
    return f"read {got} bytes at 1 KB/s"


def slow_copy(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "slow_copy")
    a.send(m.query("COPY (SELECT repeat('x', 1000) FROM generate_series(1, 2000000)) TO STDOUT"))
    time.sleep(seconds)
    a.close()
    return "read nothing"


def notify_flood(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "notify_flood")
    a.send(m.query("LISTEN abuse"))
    a.read_until_ready()
    sent = 0
    end = time.monotonic() + seconds
    with psycopg.connect(**env.conninfo(application_name="notifier"), autocommit=True) as conn:
        while time.monotonic() < end:
            conn.execute(
                "SELECT pg_notify('abuse', repeat('x', 7000) || g) FROM generate_series(1, 2000) g"
            )
            sent += 2000
    a.close()
    return f"{sent} notifications of 7 KB sent to a listener that never reads"


def notice_flood(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "notice_flood")
    a.send(
        m.query(
            "DO $$ BEGIN FOR i IN 1..5000000 LOOP RAISE NOTICE '%', repeat('n', 1000); "
            "END LOOP; END $$"
        )
    )
    time.sleep(seconds)
    a.close()
    return "5M notices of 1 KB raised, none read"


def backend_rss_mb(env: SoakEnv, app: str) -> float:
    """Private memory of the attacker's PostgreSQL backend (RssAnon), for comparison."""
    pid = env.pg.psql(f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'").strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def prepared(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "prepared")
    n, batch = 100_000, 1_000
    started = time.monotonic()
    for start in range(0, n, batch):
        a.send(
            b"".join(
                m.parse_message(f"{i:063d}", f"SELECT {i} AS c{i}")
                for i in range(start, start + batch)
            )
            + m.sync()
        )
        seen = a.read_until_ready()
        if seen:
            a.close()
            return f"refused after {start}: {seen[:1]}"
    took = time.monotonic() - started
    rss, backend = rss_mb(env.process.pid), backend_rss_mb(env, "prepared")
    a.close()
    return (
        f"{n} statements prepared in {took:.1f} s; dbward RSS with them held {rss:.0f} MB, "
        f"the PostgreSQL backend's private memory {backend:.0f} MB"
    )


def big_prepared(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "big_prepared")
    text = "SELECT '" + "x" * (1 << 20) + "' AS c"
    started = time.monotonic()
    for i in range(40):
        a.send(m.parse_message(f"big{i}", text + str(i)) + m.sync())
        seen = a.read_until_ready()
        if seen:
            a.close()
            return f"refused at {i}: {seen[:1]}"
    took = time.monotonic() - started
    rss, backend = rss_mb(env.process.pid), backend_rss_mb(env, "big_prepared")
    a.close()
    return (
        f"40 x 1 MB statements prepared in {took:.1f} s; dbward RSS with them held "
        f"{rss:.0f} MB, the PostgreSQL backend's private memory {backend:.0f} MB"
    )


def _pipeline(env: SoakEnv, seconds: float, flush: bool) -> str:
    a = Attacker(env, "pipeline_flush" if flush else "pipeline")
    one = (
        m.parse_message("", "SELECT 1")
        + m.bind_message("", "", [])
        + m.execute_message("")
        + (m.flush() if flush else b"")
    )
    chunk = one * 10_000
    thread = _send_background(a, lambda: chunk, 100)  # 1,000,000 triples
    thread.join(seconds)
    done = not thread.is_alive()
    a.close()
    return f"1M triples {'all sent' if done else 'not all accepted'} within {seconds:g} s"


def pipeline(env: SoakEnv, seconds: float) -> str:
    return _pipeline(env, seconds, flush=False)


def pipeline_flush(env: SoakEnv, seconds: float) -> str:
    return _pipeline(env, seconds, flush=True)


COSTLY: dict[str, Callable[[], str]] = {
    "parens_10k": lambda: "SELECT " + "(" * 10_000 + "1" + ")" * 10_000,
    "in_list_100k": lambda: "SELECT 1 WHERE 1 IN (" + ",".join(map(str, range(100_000))) + ")",
    "unions_10k": lambda: " UNION ALL ".join(["SELECT 1"] * 10_000),
    "stmts_16mb": lambda: "SELECT 1;" * (16 * 1024 * 1024 // 9 - 10),
    "comments_64kb": lambda: "SELECT 1 " + "/*" * 32_000,
    "plus_16mb": lambda: "SELECT 1 " + "+" * (16 * 1024 * 1024 - 100),
    "do_1mb": lambda: (
        "DO $$ DECLARE x int := 0; BEGIN "
        + " ".join(f"x := x + {i};" for i in range(80_000))
        + " END $$"
    ),
    "do_nested_2k": lambda: "DO $$ " + "BEGIN " * 2_000 + "NULL; " + "END; " * 2_000 + "$$",
}


def costly_sql(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "costly_sql")
    out = []
    for name, make in COSTLY.items():
        text = make()
        started = time.monotonic()
        a.send(m.query(text))
        seen = a.read_until_ready()
        took = time.monotonic() - started
        first = seen[0] if seen else "ok"
        out.append(f"{name} ({len(text) / 1024:.0f} KB): {took:.2f} s, {first[:70]}")
    a.close()
    return "\n      ".join(out)


def pool_hog(env: SoakEnv, seconds: float) -> str:
    """Three sessions keep the classifier worker busy with 16 MB IN lists (~15 s each) while
    another sends a 100 KB statement (classified in the same worker) every few seconds."""
    big = m.query("SELECT 1 WHERE 1 IN (" + ",".join(["1"] * (8 * 1024 * 1024 - 20)) + ")")
    stop = threading.Event()

    hogged = [0, 0, 0]
    ended: list[str] = []

    def hog(n: int) -> None:
        a = Attacker(env, "pool_hog")
        try:
            while not stop.is_set():
                a.send(big)
                a.read_until_ready(timeout=300)
                hogged[n] += 1
        except (OSError, ConnectionError) as exc:
            ended.append(f"hog {n}: {type(exc).__name__} {exc}")
        finally:
            a.close()

    hogs = [threading.Thread(target=hog, args=(i,), daemon=True) for i in range(3)]
    for thread in hogs:
        thread.start()
    time.sleep(2)
    innocent = "SELECT count(*) FROM (VALUES " + ",".join(f"({i})" for i in range(15_000))
    innocent += ") AS v(a)"
    results = []
    end = time.monotonic() + seconds
    with psycopg.connect(**env.conninfo(application_name="innocent"), autocommit=True) as conn:
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                conn.execute(innocent.encode()).fetchone()
                results.append(f"{time.monotonic() - began:.1f} s")
            except psycopg.Error as exc:
                results.append(f"{time.monotonic() - began:.1f} s {exc.sqlstate}")
            time.sleep(1)
    stop.set()
    for thread in hogs:
        thread.join(timeout=60)
    return (
        f"innocent 100 KB statements: {', '.join(results)}; 16 MB statements answered per "
        f"hog: {hogged}; {ended or 'no hog ended early'}"
    )


def cache_churn(env: SoakEnv, seconds: float) -> str:
    a = Attacker(env, "cache_churn")
    sent = 0
    end = time.monotonic() + seconds
    batch = 500
    while time.monotonic() < end and sent < 50_000:
        a.send(
            b"".join(
                m.query(f"SELECT {i} AS a{i}, 'x' AS b{i} WHERE {i} > 0")
                for i in range(sent, sent + batch)
            )
        )
        for _ in range(batch):
            a.read_until_ready()
        sent += batch
    a.close()
    return f"{sent} distinct templates"


def _copy_start(env: SoakEnv, app: str) -> Attacker:
    a = Attacker(env, app)
    with psycopg.connect(**env.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS abuse_copy (t text)")
    a.send(m.query("COPY abuse_copy FROM STDIN"))
    a.sock.settimeout(30)
    kind, _ = _read_msg(a.sock)
    assert kind == b"G", kind
    return a


def copy_big_row(env: SoakEnv, seconds: float) -> str:
    a = _copy_start(env, "copy_big_row")
    piece = m.copy_data(b"y" * 65536)
    a.sock.settimeout(None)
    for _ in range(200 * 16):
        a.send(piece)
    a.send(m.copy_data(b"\n") + m.copy_done())
    seen = a.read_until_ready(timeout=300)
    a.close()
    return f"answered: {seen[:1] or 'ok'}"


def copy_one_msg(env: SoakEnv, seconds: float) -> str:
    a = _copy_start(env, "copy_one_msg")
    size = 200 * 1024 * 1024
    a.sock.settimeout(None)
    a.send(b"d" + (size + 4).to_bytes(4, "big"))
    block = b"z" * (1 << 20)
    for _ in range(200):
        a.send(block)
    a.send(m.copy_data(b"\n") + m.copy_done())
    seen = a.read_until_ready(timeout=300)
    a.close()
    return f"answered: {seen[:1] or 'ok'}"


def copy_empty(env: SoakEnv, seconds: float) -> str:
    a = _copy_start(env, "copy_empty")
    a.send(m.copy_data(b"") * 200_000 + m.copy_done())
    seen = a.read_until_ready()
    a.close()
    return f"answered: {seen[:1] or 'ok'}"


def copy_no_done(env: SoakEnv, seconds: float) -> str:
    a = _copy_start(env, "copy_no_done")
    a.send(m.copy_data(b"partial row"))
    time.sleep(seconds)
    a.close()
    return "idled in COPY without CopyDone"


ATTACKS: dict[str, Callable[[SoakEnv, float], str]] = {
    f.__name__: f
    for f in (
        slow_rows,
        slow_copy,
        notify_flood,
        notice_flood,
        prepared,
        big_prepared,
        pipeline,
        pipeline_flush,
        costly_sql,
        pool_hog,
        cache_churn,
        copy_big_row,
        copy_one_msg,
        copy_empty,
        copy_no_done,
    )
}


# ---------------------------------------------------------------------- running


def audit_of(env: SoakEnv, app: str) -> str:
    """Intent records of the attacker's sessions and those left without an outcome."""
    db = sqlite3.connect(f"file:{env.work / 'audit.db'}?mode=ro", uri=True)
    try:
        # An outcome is written into its intent record, or as an outcome record of its own
        # (which carries the session id, not the application name).
        intents, settled = db.execute(
            "SELECT count(*), coalesce(sum(coalesce(status, '') != ''), 0) FROM audit_log "
            "WHERE event = 'statement' AND application_name = ?",
            (app,),
        ).fetchone()
        (outcomes,) = db.execute(
            "SELECT count(*) FROM audit_log WHERE event = 'outcome' AND session_id IN "
            "(SELECT session_id FROM audit_log WHERE event = 'connect' AND application_name = ?)",
            (app,),
        ).fetchone()
        open_ = intents - settled - outcomes
        events = dict(
            db.execute(
                "SELECT event, count(*) FROM audit_log WHERE application_name = ? GROUP BY event",
                (app,),
            ).fetchall()
        )
    finally:
        db.close()
    return f"{intents} intents, {open_} without outcome; events {events}"


def run_attack(env: SoakEnv, watch: Watch, name: str, seconds: float) -> None:
    pid = env.process.pid
    time.sleep(1.0)
    before_rss, before_cpu = rss_mb(pid), cpu_s(pid)
    watch.window = window = Window()
    started = time.monotonic()
    try:
        result = ATTACKS[name](env, seconds)
    except Exception as exc:  # the attack itself failing is a result too
        result = f"attacker: {type(exc).__name__}: {exc}"
    took = time.monotonic() - started
    time.sleep(5.0)  # the session's end handled, memory given back
    alive = env.process.poll() is None
    after_rss = rss_mb(pid) if alive else 0.0
    cpu = cpu_s(pid) - before_cpu if alive else 0.0
    lat = sorted(window.latencies) or [0.0]
    print(f"== {name} ({took:.1f} s)")
    print(f"   {result}")
    print(
        f"   dbward {'alive' if alive else 'DEAD'}; RSS {before_rss:.0f} -> peak "
        f"{max(window.rss, default=0):.0f} -> {after_rss:.0f} MB; CPU {cpu:.1f} s"
    )
    print(
        f"   prober: {len(window.latencies)} queries, median {statistics.median(lat) * 1e3:.1f} "
        f"ms, worst {lat[-1] * 1e3:.0f} ms, errors {window.prober_errors[:2]}"
    )
    print(f"   audit: {audit_of(env, name)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    env = start_env()
    watch = Watch(env)
    try:
        for name in args.only or ATTACKS:
            run_attack(env, watch, name, args.seconds)
            if env.process.poll() is not None:
                print(f"dbward exited ({env.process.returncode}); log: {env.log_path}")
                break
    finally:
        watch.close()
        stop_env(env, args.keep)


if __name__ == "__main__":
    main()
