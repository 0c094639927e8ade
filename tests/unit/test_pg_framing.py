"""FrontendFramer, BackendFramer and BackendScanner: chunking, limits and malformed streams."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dbward.core.errors import ProtocolError
from dbward.wire.postgres import messages as m
from dbward.wire.postgres.framing import (
    FRONTEND_TYPES,
    IN_PLACE_MIN_BYTES,
    BackendFramer,
    BackendScanner,
    FrontendFramer,
)


def frame(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


# --------------------------------------------------------------------------------------------
# FrontendFramer
# --------------------------------------------------------------------------------------------


def test_startup_then_messages_in_one_feed() -> None:
    framer = FrontendFramer()
    startup = m.startup_message({"user": "alice", "database": "db"})
    q = m.query("select 1")
    msgs = framer.feed(startup + q + m.sync())
    assert [t for t, _, _ in msgs] == [0, ord("Q"), ord("S")]
    assert msgs[0][2] == startup and msgs[0][1] == startup[4:]
    assert msgs[1][1] == b"select 1\x00" and msgs[1][2] == q
    assert framer.startup is False
    assert framer.pending_bytes == 0


def test_ssl_request_keeps_startup_mode() -> None:
    framer = FrontendFramer()
    msgs = framer.feed(m.ssl_request())
    assert msgs == [(0, m.ssl_request()[4:], m.ssl_request())]
    assert framer.startup is True
    assert framer.pending_bytes == 0


def test_bytes_pipelined_after_ssl_request_are_visible() -> None:
    # The relay must refuse these when it answers 'S' (plaintext before the TLS handshake).
    framer = FrontendFramer()
    startup = m.startup_message({"user": "u"})
    msgs = framer.feed(m.ssl_request() + startup + m.query("x")[:3])
    assert [raw for _, _, raw in msgs] == [m.ssl_request(), startup]
    assert framer.pending_bytes == 3


def test_ssl_refused_then_startup() -> None:
    framer = FrontendFramer()
    assert len(framer.feed(m.ssl_request())) == 1
    startup = m.startup_message({"user": "u"})
    msgs = framer.feed(startup[:3])
    assert msgs == []
    msgs = framer.feed(startup[3:])
    assert msgs == [(0, startup[4:], startup)]


def test_cancel_request_framed() -> None:
    framer = FrontendFramer()
    raw = m.cancel_request(42, b"\x01\x02\x03\x04")
    assert framer.feed(raw) == [(0, raw[4:], raw)]


def test_gssenc_then_startup_in_one_feed() -> None:
    framer = FrontendFramer()
    startup = m.startup_message({"user": "u"})
    msgs = framer.feed(m.gssenc_request() + startup + m.sync())
    assert [t for t, _, _ in msgs] == [0, 0, ord("S")]
    assert framer.startup is False


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_startup_length_too_small(length: int) -> None:
    with pytest.raises(ProtocolError):
        FrontendFramer().feed(struct.pack("!II", length, 196608))


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 0xFFFFFFFF])
def test_a_startup_length_out_of_bounds_is_refused_before_the_code_word(length: int) -> None:
    """The length is checked once its 4 bytes are in, as PostgreSQL does: a client that sent
    `\\0\\0\\0\\x04` and nothing more was left waiting, holding its slots, until
    auth_timeout_s."""
    with pytest.raises(ProtocolError):
        FrontendFramer().feed(struct.pack("!I", length))


def test_startup_packet_too_long_rejected_from_header() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        FrontendFramer().feed(struct.pack("!II", 10001, 196608))


def test_startup_negative_length() -> None:
    with pytest.raises(ProtocolError):
        FrontendFramer().feed(struct.pack("!iI", -5, 196608))


@pytest.mark.parametrize(
    ("length", "code"),
    [(12, 80877102), (20, 80877102), (12, 80877103), (12, 80877104), (8, 12345679)],
)
def test_startup_bad_special_lengths_or_codes(length: int, code: int) -> None:
    with pytest.raises(ProtocolError):
        FrontendFramer().feed(struct.pack("!II", length, code) + b"\x00" * (length - 8))


def test_startup_unsupported_protocol() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0"):
        FrontendFramer().feed(struct.pack("!II", 9, 2 << 16) + b"\x00")


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_message_length_too_small(length: int) -> None:
    with pytest.raises(ProtocolError, match="invalid message length"):
        FrontendFramer(startup=False).feed(b"Q" + struct.pack("!I", length))


def test_message_negative_length_is_huge() -> None:
    with pytest.raises(ProtocolError):
        FrontendFramer(startup=False).feed(b"Q" + struct.pack("!i", -1))


def test_oversized_rejected_before_body() -> None:
    framer = FrontendFramer(1000, startup=False)
    # Exactly at the limit: accepted (type byte + body == max).
    assert framer.feed(frame(b"d", b"x" * 999))[0][1] == b"x" * 999
    with pytest.raises(ProtocolError, match="exceeds"):
        framer.feed(b"d" + struct.pack("!I", 1000 + 4))


def test_unknown_type() -> None:
    with pytest.raises(ProtocolError, match="invalid frontend message type"):
        FrontendFramer(startup=False).feed(frame(b"Z", b""))
    with pytest.raises(ProtocolError, match="0x00"):
        FrontendFramer(startup=False).feed(b"\x00\x00\x00\x00\x04")


def test_large_message_many_small_feeds() -> None:
    framer = FrontendFramer(startup=False)
    body = bytes(range(256)) * 4000
    raw = frame(b"d", body)
    got = []
    for i in range(0, len(raw), 7):
        got += framer.feed(raw[i : i + 7])
        if i + 7 < len(raw):
            assert framer.pending_bytes == i + 7
    assert got == [(ord("d"), body, raw)]
    assert framer.pending_bytes == 0


def test_large_message_over_several_feeds_is_handed_over_in_place() -> None:
    """Review 25: a large message gathered over several feeds is returned in the buffer it was
    gathered in (a bytearray, its payload a view of it), not copied twice; what follows it in
    the last feed is framed as usual, into a new buffer."""
    framer = FrontendFramer(startup=False)
    body = bytes(range(256)) * (IN_PLACE_MIN_BYTES // 256)
    raw = frame(b"d", body)
    after = m.sync() + m.query("select 1")
    stream = raw + after + m.query("select 2")[:3]
    cut = len(raw) - 10
    assert framer.feed(stream[:100]) == []
    assert framer.expected_bytes == len(raw)
    assert framer.feed(stream[100:cut]) == []
    got = framer.feed(stream[cut:])
    assert [t for t, _, _ in got] == [ord("d"), ord("S"), ord("Q")]
    _, payload, whole = got[0]
    assert type(whole) is bytearray and whole == raw
    assert type(payload) is memoryview and payload == body
    assert [(p, r) for _, p, r in got[1:]] == [(b"", m.sync()), (b"select 1\x00", after[5:])]
    assert framer.pending_bytes == 3 and framer.expected_bytes == 0
    # The framer goes on in a buffer of its own: the one handed over is never touched again.
    framer.feed(m.query("select 2")[3:] + raw[:50])
    assert whole == raw
    # A message just as large that arrives in one feed is plain bytes.
    framer = FrontendFramer(startup=False)
    ((_, payload, whole),) = framer.feed(raw)
    assert type(payload) is bytes and type(whole) is bytes


def test_a_large_message_completed_by_its_last_byte_leaves_an_empty_buffer() -> None:
    framer = FrontendFramer(startup=False)
    body = b"q" * (2 * IN_PLACE_MIN_BYTES)
    raw = frame(b"B", body)
    assert framer.feed(raw[:-1]) == []
    ((msg_type, payload, whole),) = framer.feed(raw[-1:])
    assert (msg_type, payload, whole) == (ord("B"), body, raw)
    assert framer.pending_bytes == 0
    assert framer.feed(m.sync()) == [(ord("S"), b"", m.sync())]


FRONTEND_MESSAGES = st.one_of(
    st.text(max_size=50).filter(lambda s: "\x00" not in s).map(m.query),
    st.binary(max_size=100).map(m.copy_data),
    st.just(m.sync()),
    st.just(m.flush()),
    st.just(m.copy_done()),
    st.tuples(st.text(max_size=10), st.integers(0, 100)).map(
        lambda t: m.execute_message(t[0].replace("\x00", ""), t[1])
    ),
)


@given(st.lists(FRONTEND_MESSAGES, max_size=20), st.lists(st.integers(0, 10_000), max_size=20))
def test_frontend_any_chunking(msgs: list[bytes], cuts: list[int]) -> None:
    startup = m.startup_message({"user": "u", "database": "d"})
    stream = startup + b"".join(msgs)
    framer = FrontendFramer()
    got = []
    for chunk in split(stream, cuts):
        got += framer.feed(chunk)
    assert [raw for _, _, raw in got] == [startup, *msgs]
    assert all(raw[5:] == payload for t, payload, raw in got if t)
    assert framer.pending_bytes == 0


# A header of any length, valid or not, followed by a few bytes.
_HEADERS = st.builds(
    lambda t, n, tail: bytes([t]) + n.to_bytes(4, "big") + tail,
    st.sampled_from([*sorted(FRONTEND_TYPES), 0, 0x7A]),
    st.one_of(st.integers(0, 24), st.integers(0, 2**32 - 1)),
    st.binary(max_size=20),
)


def _frames_or_error(framer: FrontendFramer, chunks: list[bytes | bytearray]) -> object:
    got: list[object] = []
    try:
        for chunk in chunks:
            got += [(t, bytes(p), bytes(r)) for t, p, r in framer.feed(chunk)]  # type: ignore[arg-type]
    except ProtocolError as exc:
        return ("error", str(exc), got)
    return (got, framer.pending_bytes, framer.expected_bytes)


@settings(max_examples=300)
@given(
    st.lists(FRONTEND_MESSAGES, max_size=8),
    st.one_of(_HEADERS, st.binary(max_size=12)),
    st.lists(st.integers(0, 2_000), max_size=6),
)
@example([], b"Q\x00\x00\x00\x03xyz", [])  # a length below 4
def test_frontend_fresh_feeds_frame_as_buffered_ones_do(
    parts: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    # A feed into an empty buffer is cut from the bytes themselves (the fast path); a bytearray
    # feed always goes through the buffer. Same frames, same leftovers, same errors.
    stream = b"".join(parts) + tail
    chunks = split(stream, cuts)
    limit = 16  # small enough for the generated headers to reach it
    fresh = _frames_or_error(FrontendFramer(limit, startup=False), chunks)
    buffered = _frames_or_error(
        FrontendFramer(limit, startup=False), [bytearray(c) for c in chunks]
    )
    assert fresh == buffered


@given(st.binary(max_size=300), st.booleans())
def test_frontend_garbage_only_protocol_error(data: bytes, startup: bool) -> None:
    framer = FrontendFramer(startup=startup)
    try:
        framer.feed(data)
        framer.feed(data)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------------------------
# BackendFramer
# --------------------------------------------------------------------------------------------


def test_backend_framer_auth_sequence() -> None:
    stream = (
        m.authentication_sasl(["SCRAM-SHA-256"])
        + m.parameter_status("server_version", "18.0")
        + m.backend_key_data(7, b"abcd")
        + m.ready_for_query(b"I")
    )
    framer = BackendFramer()
    got = []
    for i in range(len(stream)):
        got += framer.feed(stream[i : i + 1])
    assert framer.pending_bytes == 0
    assert got[1][1] == b"server_version\x0018.0\x00"
    assert [chr(t) for t, _, _ in got] == ["R", "S", "K", "Z"]


def test_backend_framer_errors() -> None:
    with pytest.raises(ProtocolError):
        BackendFramer().feed(frame(b"Q", b""))
    with pytest.raises(ProtocolError):
        BackendFramer().feed(b"R\x00\x00\x00\x03")
    with pytest.raises(ProtocolError):
        BackendFramer(100).feed(b"R\x00\x00\x01\x00")


@given(st.binary(max_size=300))
def test_backend_framer_garbage(data: bytes) -> None:
    try:
        BackendFramer().feed(data)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------------------------
# BackendScanner
# --------------------------------------------------------------------------------------------

ROW_VALUES = st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=5)
BACKEND_MESSAGES = st.one_of(
    ROW_VALUES.map(m.data_row),
    ROW_VALUES.map(m.data_row),
    st.binary(max_size=200).map(m.copy_data),
    st.sampled_from([b"SELECT 1", b"INSERT 0 3", b"BEGIN"]).map(lambda t: frame(b"C", t + b"\0")),
    st.sampled_from([b"I", b"T", b"E"]).map(m.ready_for_query),
    st.text(max_size=30).map(lambda s: m.error_response("ERROR", "42501", s)),
    st.text(max_size=30).map(lambda s: m.notice_response("NOTICE", "00000", s)),
    st.tuples(st.text(max_size=8), st.text(max_size=8)).map(
        lambda t: m.parameter_status(t[0].replace("\0", ""), t[1].replace("\0", ""))
    ),
    st.binary(max_size=60).map(lambda b: frame(b"T", b)),
    st.just(frame(b"1", b"")),
    st.just(frame(b"2", b"")),
    st.just(frame(b"n", b"")),
    st.just(m.empty_query_response()),
    st.just(m.copy_done()),
    st.binary(max_size=20).map(lambda b: frame(b"H", b)),
)

PAYLOAD_TYPES = set(b"CEZSKRAGHWvN")


def scan_all(
    scanner: BackendScanner, chunks: list[bytes]
) -> tuple[bytes, list[tuple[int, bytes, bytes | None]]]:
    """Feed chunks; return the forwarded stream and (type, frame, payload) per event."""
    out = bytearray()
    spans = []
    for chunk in chunks:
        fwd, events = scanner.feed(chunk)
        for msg_type, start, end, payload in events:
            assert fwd[start] == msg_type
            if msg_type not in (ord("D"), ord("d")):  # a DataRow/CopyData may be split
                assert end <= len(fwd)
            # Offsets in the whole stream: the rest of a split frame comes in later feeds.
            spans.append((msg_type, len(out) + start, len(out) + end, payload))
        out += fwd
    seen = []
    for msg_type, start, end, payload in spans:
        whole = bytes(out[start:end])
        assert struct.unpack("!I", whole[1:5])[0] + 1 == len(whole)
        seen.append((msg_type, whole, payload))
    return bytes(out), seen


def reported(msgs: list[bytes]) -> list[bytes]:
    """The messages the scanner reports: all but a DataRow/CopyData following one of its type."""
    data = (ord("D"), ord("d"))
    return [
        raw
        for i, raw in enumerate(msgs)
        if raw[0] not in data or i == 0 or msgs[i - 1][0] != raw[0]
    ]


@given(st.lists(BACKEND_MESSAGES, max_size=30), st.lists(st.integers(0, 100_000), max_size=30))
@settings(max_examples=300)
def test_scanner_any_chunking(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(msgs)
    scanner = BackendScanner()
    out, seen = scan_all(scanner, split(stream, cuts))
    assert out == stream
    assert scanner.at_boundary and scanner.pending_bytes == 0
    assert [whole for _, whole, _ in seen] == reported(msgs)
    for msg_type, whole, payload in seen:
        assert payload == (whole[5:] if msg_type in PAYLOAD_TYPES else None)


def test_scanner_returns_input_object_when_nothing_held() -> None:
    rows = b"".join(m.data_row([b"x" * i]) for i in range(50))
    data = rows + m.command_complete("SELECT 50") + m.ready_for_query(b"I")
    scanner = BackendScanner()
    out, events = scanner.feed(data)
    assert out is data
    assert [(chr(t), p) for t, _, _, p in events] == [
        ("D", None),  # the first row only
        ("C", b"SELECT 50\0"),
        ("Z", b"I"),
    ]


def test_scanner_streams_split_data_row() -> None:
    row = m.data_row([b"a" * 1000])
    scanner = BackendScanner()
    # Reported before any of it is forwarded: its end lies beyond this feed.
    assert scanner.feed(row[:10]) == (row[:10], [(ord("D"), 0, len(row), None)])
    assert not scanner.at_boundary and scanner.mid_frame
    assert scanner.feed(row[10:500]) == (row[10:500], [])
    tail = row[500:] + m.ready_for_query(b"I")
    out, events = scanner.feed(tail)
    assert out is tail
    assert events == [(ord("Z"), len(row) - 500, len(tail), b"I")]


def test_scanner_holds_incomplete_error_response() -> None:
    err = m.error_response("ERROR", "42501", "denied")
    scanner = BackendScanner()
    row = m.data_row([b"1"])
    out, events = scanner.feed(row + err[:7])
    assert out == row and events == [(ord("D"), 0, len(row), None)]
    assert scanner.pending_bytes == 7
    out, events = scanner.feed(err[7:20])
    assert out == b"" and events == []
    out, events = scanner.feed(err[20:])
    assert out == err and events == [(ord("E"), 0, len(err), err[5:])]


def test_scanner_reports_the_first_row_of_each_run() -> None:
    """Rows that follow one another are one run, across feeds and split frames: only its first
    is reported. Any other message (a notice among the rows) ends the run, and so does a frame
    of the other data type (CopyData among DataRows)."""
    rows = [m.data_row([b"r%d" % i]) for i in range(4)]
    notice = m.notice_response("NOTICE", "00000", "n")
    copy = m.copy_data(b"c")
    stream = rows[0] + rows[1] + notice + rows[2] + copy + rows[3] + rows[0]
    scanner = BackendScanner()
    out, events = scanner.feed(stream[:3])  # a split header is held
    assert (out, events) == (b"", [])
    cut = len(rows[0]) + 6  # inside the second row, past its header
    out, events = scanner.feed(stream[3:cut])
    assert [(chr(t), s) for t, s, _, _ in events] == [("D", 0)]
    assert scanner.mid_frame
    out, events = scanner.feed(stream[cut:])
    assert [chr(t) for t, _, _, _ in events] == ["N", "D", "d", "D"]
    offset = cut
    assert [s + offset for _, s, _, _ in events] == [
        stream.index(notice),
        stream.index(rows[2]),
        stream.index(copy),
        stream.index(rows[3]),
    ]
    # The run goes on into the next feed: nothing reported for its rows.
    assert scanner.feed(rows[1] + rows[2]) == (rows[1] + rows[2], [])
    out, events = scanner.feed(copy)
    assert [chr(t) for t, _, _, _ in events] == ["d"]


def test_scanner_split_header() -> None:
    row = m.data_row([b"abc"])
    scanner = BackendScanner()
    assert scanner.feed(row[:3]) == (b"", [])
    assert scanner.feed(row[3:]) == (row, [(ord("D"), 0, len(row), None)])


@pytest.mark.parametrize("msg_type", [b"D", b"d", b"C"])
@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_scanner_bad_length(msg_type: bytes, length: int) -> None:
    with pytest.raises(ProtocolError):
        BackendScanner().feed(msg_type + struct.pack("!I", length))


def test_scanner_oversized_non_data_rejected_from_header() -> None:
    scanner = BackendScanner(max_message_bytes=1000)
    with pytest.raises(ProtocolError, match="too large"):
        scanner.feed(b"E" + struct.pack("!I", 5000))
    # Data rows are streamed, so they have no cap.
    big = BackendScanner(max_message_bytes=1000)
    out, _ = big.feed(b"D" + struct.pack("!I", 5000) + b"x" * 10)
    assert len(out) == 15


def test_scanner_unknown_type() -> None:
    with pytest.raises(ProtocolError, match="invalid backend message type"):
        BackendScanner().feed(frame(b"Q", b""))


@given(st.binary(max_size=400), st.lists(st.integers(0, 1000), max_size=5))
def test_scanner_garbage_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    scanner = BackendScanner()
    try:
        for chunk in split(data, cuts):
            scanner.feed(chunk)
    except ProtocolError:
        pass


def test_scanner_mid_frame_only_for_forwarded_partial_rows() -> None:
    """Held bytes (a partial header or a partial notice) were not forwarded: not mid-frame."""
    scanner = BackendScanner()
    notice = m.notice_response("WARNING", "01000", "careful")
    assert scanner.feed(notice[:8]) == (b"", [])
    assert not scanner.at_boundary and not scanner.mid_frame
    out, events = scanner.feed(notice[8:] + b"D\x00")
    assert out == notice and len(events) == 1
    assert not scanner.mid_frame  # a partial DataRow header is held too
    row = m.data_row([b"x" * 100])
    assert scanner.feed(row[2:20]) == (b"D\x00" + row[2:20], [(ord("D"), 0, len(row), None)])
    assert scanner.mid_frame
    assert scanner.feed(row[20:]) == (row[20:], [])
    assert scanner.at_boundary and not scanner.mid_frame
