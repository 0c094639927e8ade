"""The metrics collector reads the counts the relay keeps; readiness; the `metrics` settings.

The sessions here are real PgSessions fed the bytes a client and PostgreSQL send (no
sockets); the scrape goes through prometheus_client's own exposition and parser. The HTTP
endpoint of a running `dbward serve` is tested in tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbward.audit.process import ProcessAuditSink
from dbward.audit.records import AuditEvent, AuditRecord
from dbward.audit.sink import HeldRecord, MemorySink
from dbward.config import parse_config
from dbward.config.model import AuditSettings
from dbward.core.errors import AuditUnavailable, ConfigError
from dbward.relay.postgres import _POISON_QUERY, _POISON_RUN_QUERY, PgSession
from dbward.relay.services import ListenerServices
from dbward.server.metrics import build_registry, not_ready_reason
from dbward.wire.postgres import messages as m
from fixtures.detached import PeerTransport, detached_session

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class _Listener:
    services: ListenerServices
    serving: bool = True


@dataclass
class _Audit:
    healthy: bool = True
    pending_records: int = 0
    committed_records: int = 0
    restarts: int = 0


@dataclass
class _Proxy:
    """Stands in for the Runtime: what the endpoint reads of it."""

    observed_listeners: list[_Listener] = field(default_factory=list)
    audit: _Audit = field(default_factory=_Audit)
    draining: bool = False
    expected_listeners: int = 1
    accept_failing: bool = False


def _scrape(proxy: _Proxy) -> tuple[str, Samples]:
    text = generate_latest(build_registry(proxy)).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def _statements(samples: Samples) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == "dbward_statements_total" and value:
            found = dict(labels)
            out[(found["decision"], found["kind"])] += int(value)
    return out


def _answer_select(session: PgSession) -> None:
    session._on_upstream_data(m.command_complete("SELECT 0") + m.ready_for_query(b"I"))


def _answer_poison(session: PgSession) -> None:
    """PostgreSQL refuses the statement dbward sent in place of a denied one."""
    session._on_upstream_data(
        m.error_response("ERROR", "42601", "syntax error") + m.ready_for_query(b"I")
    )


def test_statement_counts_follow_the_decisions_the_audit_log_records() -> None:
    sink = MemorySink()
    session, _, _ = detached_session(sink)
    proxy = _Proxy([_Listener(session.services)])
    _, before = _scrape(proxy)
    assert _statements(before) == Counter()

    session.data_received(m.query("SELECT 1"))
    _answer_select(session)
    session.data_received(m.query("SET ROLE postgres"))  # denied: never reaches PostgreSQL
    _answer_poison(session)
    session.data_received(m.query("SELECT 2; SET ROLE postgres"))  # denied whole: one denial wins
    _answer_poison(session)
    session.data_received(m.parse_message("s", "SELECT 3") + m.sync())  # decided, not recorded
    session._on_upstream_data(m._frame(b"1", b"") + m.ready_for_query(b"I"))

    text, after = _scrape(proxy)
    recorded = Counter(
        (str(r.decision), str(r.kind)) for r in sink.records if r.event == AuditEvent.STATEMENT
    )
    assert (
        _statements(after)
        == recorded
        == Counter({("allow", "read"): 1, ("deny", "session"): 2, ("deny", "read"): 1})
    )
    # Every kind and decision is a series (so a rate() has a zero to start from), per listener.
    series = [k for k in after if k[0] == "dbward_statements_total"]
    assert len(series) == 8 * 3
    assert all(dict(labels)["listener"] == "t" for _, labels in series)
    for needle in ("SELECT", "ROLE", "alice", "127.0.0.1", "postgres"):
        assert needle not in text


def test_statements_refused_because_the_audit_log_fails_are_counted_as_such() -> None:
    sink = MemorySink()
    session, client, _ = detached_session(sink)
    proxy = _Proxy([_Listener(session.services)], audit=_Audit(healthy=False))
    sink.fail = True
    session.data_received(m.query("SELECT 1"))
    _answer_poison(session)
    session.data_received(m.query("SET ROLE postgres"))  # the audit log refuses it first
    _answer_poison(session)
    assert client.written.count(b"58030") == 2  # refused: nothing runs unrecorded
    _, samples = _scrape(proxy)
    # Not policy denials: an alert on the deny rate is not set off by an audit outage.
    assert _statements(samples) == Counter(
        {("audit_unavailable", "read"): 1, ("audit_unavailable", "session"): 1}
    )
    assert samples[("dbward_audit_failing", ())] == 1


class _DurableFails(MemorySink):
    """The log takes records, but cannot make an intent durable (a write failure)."""

    def append_durable(self, record: AuditRecord) -> asyncio.Future[int]:
        self.append(record)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_exception(AuditUnavailable("disk full"))
        return future


class _BacklogFull(MemorySink):
    """Healthy when the statement is decided, full when its intent is queued."""

    def hold(self, record: AuditRecord) -> HeldRecord:
        raise AuditUnavailable("audit log backlog is full")


def test_a_statement_refused_because_its_intent_could_not_be_written_is_not_allowed() -> None:
    """Review 45: a write in `strict` mode was counted `allow` when decided, then refused
    (58030, `not_executed`) when its durable intent failed: the metrics said it ran."""

    async def run(sink: MemorySink, sql: str) -> tuple[bytes, Counter[tuple[str, str]]]:
        session, client, upstream = detached_session(sink)
        session.services.audit_settings = AuditSettings(durability="strict")
        session.data_received(m.query(sql))
        for _ in range(5):
            await asyncio.sleep(0)  # the durable write settles
        if _POISON_QUERY in upstream.written or _POISON_RUN_QUERY in upstream.written:
            _answer_poison(session)
        _, samples = _scrape(_Proxy([_Listener(session.services)]))
        return bytes(client.written + upstream.written), _statements(samples)

    written, counted = asyncio.run(run(_DurableFails(), "INSERT INTO t VALUES (1); SELECT 1"))
    assert b"58030" in written and b"INSERT" not in written  # refused, never forwarded
    assert counted == Counter({("audit_unavailable", "write"): 1, ("audit_unavailable", "read"): 1})
    written, counted = asyncio.run(run(_BacklogFull(), "SELECT 1"))
    assert b"58030" in written
    assert counted == Counter({("audit_unavailable", "read"): 1})
    # Made durable: forwarded, and counted allowed once that is known.
    written, counted = asyncio.run(run(MemorySink(), "INSERT INTO t VALUES (1)"))
    assert b"INSERT" in written
    assert counted == Counter({("allow", "write"): 1})


def test_session_events_and_connections_are_counted() -> None:
    sink = MemorySink()
    session, _, _ = detached_session(sink)
    services = session.services
    proxy = _Proxy([_Listener(services)])
    # A connection arriving while draining is refused at once, and counted as such.
    services.draining = True
    late = PgSession(services)
    late.connection_made(PeerTransport("192.0.2.7"))  # type: ignore[arg-type]
    # The session's database connection is lost.
    session._on_upstream_lost(None)
    text, samples = _scrape(proxy)
    assert samples[("dbward_connections_total", (("listener", "t"),))] == 1
    refused = ("dbward_connections_refused_total", (("listener", "t"), ("reason", "draining")))
    assert samples[refused] == 1
    assert samples[("dbward_upstream_lost_total", (("listener", "t"),))] == 1
    assert [r.event for r in sink.records] == [AuditEvent.UPSTREAM_LOST]
    assert "192.0.2.7" not in text


def test_sessions_and_audit_gauges_are_read_at_scrape_time() -> None:
    session, _, _ = detached_session(MemorySink())
    services = session.services
    audit = _Audit(pending_records=7, committed_records=41, restarts=2)
    proxy = _Proxy([_Listener(services)], audit=audit)
    services.sessions.add(session)
    _, samples = _scrape(proxy)
    assert samples[("dbward_sessions_active", (("listener", "t"),))] == 1
    assert samples[("dbward_audit_queue_records", ())] == 7
    assert samples[("dbward_audit_records_total", ())] == 41
    assert samples[("dbward_audit_writer_restarts_total", ())] == 2
    services.sessions.discard(session)
    audit.committed_records = 42
    _, samples = _scrape(proxy)
    assert samples[("dbward_sessions_active", (("listener", "t"),))] == 0
    assert samples[("dbward_audit_records_total", ())] == 42


def test_readiness_names_what_is_wrong() -> None:
    session, _, _ = detached_session(MemorySink())
    listener = _Listener(session.services)
    proxy = _Proxy([listener])
    assert not_ready_reason(proxy) is None
    proxy.expected_listeners = 2  # the second one is not bound yet
    assert not_ready_reason(proxy) == "starting: not every listener is accepting connections"
    proxy.expected_listeners = 1
    listener.serving = False
    assert not_ready_reason(proxy) == "starting: not every listener is accepting connections"
    listener.serving = True
    proxy.accept_failing = True
    assert not_ready_reason(proxy) == "out of file descriptors: new connections cannot be accepted"
    proxy.accept_failing = False
    proxy.audit.healthy = False
    assert not_ready_reason(proxy) == "audit log failing: statements are refused"
    proxy.draining = True  # draining says so first: it is the reason that will not pass
    assert not_ready_reason(proxy) == "draining: shutting down"


def test_the_process_sink_counts_what_its_writer_committed(tmp_path: Path) -> None:
    async def run() -> tuple[int, int, int]:
        sink = ProcessAuditSink(tmp_path / "audit.db", max_delay_ms=20)
        sink.start()
        try:
            for i in range(5):
                sink.append(AuditRecord(event=AuditEvent.CONNECT, ts_ms=i, session_id="s"))
            queued = sink.pending_records
            await sink.flush()
            return queued, sink.pending_records, sink.committed_records
        finally:
            await sink.close()

    assert asyncio.run(run()) == (5, 0, 5)


# ------------------------------------------------------------------ configuration


def _config(metrics: object) -> object:
    return parse_config(
        {"listeners": [{"name": "l", "upstream": {"user": "svc"}}], "metrics": metrics},
        base_dir=Path("/"),
    )


def test_no_metrics_section_means_no_endpoint() -> None:
    config = parse_config(
        {"listeners": [{"name": "l", "upstream": {"user": "svc"}}]}, base_dir=Path("/")
    )
    assert config.metrics is None


def test_a_metrics_address_is_read() -> None:
    config = _config({"listen": "[::1]:9187"})
    assert config.metrics is not None  # type: ignore[attr-defined]
    assert config.metrics.listen_host == "::1"  # type: ignore[attr-defined]
    assert config.metrics.listen_port == 9187  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({}, "metrics.listen: Field required"),
        ({"listen": "metrics.internal:9187"}, "metrics.listen: 'metrics.internal' is not an IP"),
        ({"listen": "127.0.0.1"}, "metrics.listen: expected HOST:PORT, e.g. 127.0.0.1:9187"),
        ({"listen": "127.0.0.1:0"}, "metrics.listen: expected HOST:PORT"),
        ({"listen": "127.0.0.1:9187", "path": "/m"}, "metrics.path: Extra inputs are not"),
        ("127.0.0.1:9187", "metrics: Input should be a mapping (key: value)"),
    ],
)
def test_metrics_errors_name_the_key(metrics: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(metrics)
    problems = caught.value.message.splitlines()[1:]
    assert len(problems) == 1, problems
    assert problems[0].strip().startswith(expected), problems


_OPERATIONS_MD = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _documented_metrics() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """docs/operations.md's metrics table: name -> (type, label names, meaning)."""
    text = _OPERATIONS_MD.read_text(encoding="utf-8")
    table = text.split("### Metrics", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    out = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        found = re.fullmatch(r"`(dbward_\w+)(?:\{([\w,]+)\})?`", cells[0])
        if found is None:
            assert cells[0] == "`process_*`", f"not a metric row: {line[:60]}"
            continue
        labels = tuple(sorted(found.group(2).split(","))) if found.group(2) else ()
        out[found.group(1)] = (cells[1], labels, cells[2])
    return out


def test_docs_operations_md_lists_every_metric_with_its_labels_and_values() -> None:
    """Review r64: the metrics table is what operators write alerts from; each name, type and
    label there must be what /metrics serves, and each label value it serves must be named."""
    session, _, _ = detached_session(MemorySink())
    text = generate_latest(build_registry(_Proxy([_Listener(session.services)]))).decode()
    served: dict[str, tuple[str, set[str], dict[str, set[str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("dbward_"):
                continue  # process_*: prometheus_client's, documented as one row
            kind, labels, values = served.setdefault(sample.name, (family.type, set(), {}))
            labels.update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
    documented = _documented_metrics()
    assert set(documented) == set(served)
    for name, (kind, labels, values) in served.items():
        doc_kind, doc_labels, meaning = documented[name]
        assert (doc_kind, doc_labels) == (kind, tuple(sorted(labels))), name
        for label, seen in values.items():
            if label in ("listener", "version"):
                continue  # the listener's configured name; dbward's version
            missing = sorted(value for value in seen if f"`{value}`" not in meaning)
            assert not missing, f"{name}: {label} values not in docs/operations.md: {missing}"
