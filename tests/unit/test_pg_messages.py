"""Message bodies: build -> frame -> parse round trips, and malformed bodies."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbward.core.errors import ProtocolError
from dbward.wire.postgres import messages as m
from dbward.wire.postgres.framing import BackendFramer, FrontendFramer

NO_NUL = st.text(max_size=40).map(lambda s: s.replace("\x00", ""))
NAME = st.text(max_size=12).map(lambda s: s.replace("\x00", ""))


def frame_one_frontend(raw: bytes, *, chunk: int = 3) -> tuple[int, bytes]:
    framer = FrontendFramer(startup=raw[:1] in (b"\x00",))
    got = []
    for i in range(0, len(raw), chunk):
        got += framer.feed(raw[i : i + chunk])
    assert len(got) == 1 and got[0][2] == raw and framer.pending_bytes == 0
    return got[0][0], got[0][1]


def frame_one_backend(raw: bytes) -> tuple[int, bytes]:
    framer = BackendFramer()
    got = framer.feed(raw)
    assert len(got) == 1 and got[0][2] == raw
    return got[0][0], got[0][1]


# --------------------------------------------------------------------------------------------
# Frontend round trips
# --------------------------------------------------------------------------------------------


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10).map(lambda s: s.replace("\x00", "x")), NO_NUL, max_size=64
    )
)
def test_startup_round_trip(params: dict[str, str]) -> None:
    raw = m.startup_message(params)
    framer = FrontendFramer()
    ((msg_type, payload, _),) = framer.feed(raw)
    assert msg_type == 0
    parsed = m.parse_startup_packet(payload)
    assert parsed == m.StartupMessage(196608, params)


def test_special_startup_packets() -> None:
    assert m.parse_startup_packet(m.ssl_request()[4:]) == m.SSLRequest()
    assert m.parse_startup_packet(m.gssenc_request()[4:]) == m.GSSENCRequest()
    cancel = m.parse_startup_packet(m.cancel_request(1234, b"\xff\x00\x01\x02")[4:])
    assert cancel == m.CancelRequest(1234, b"\xff\x00\x01\x02")


@given(NO_NUL, st.sampled_from(["utf-8", "latin-1"]))
def test_query_round_trip(text: str, encoding: str) -> None:
    try:
        raw = m.query(text, encoding)
    except UnicodeEncodeError:
        return
    msg_type, payload = frame_one_frontend(raw)
    assert msg_type == ord("Q")
    assert m.parse_query(payload, encoding) == text


@given(NAME, NO_NUL, st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_parse_round_trip(name: str, text: str, oids: list[int]) -> None:
    msg_type, payload = frame_one_frontend(m.parse_message(name, text, oids))
    assert msg_type == ord("P")
    assert m.parse_parse(payload) == m.ParseMsg(name, text, tuple(oids))


@given(
    NAME,
    NAME,
    st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=10),
    st.sampled_from(["none", "one", "each"]),
    st.lists(st.integers(0, 1), max_size=3),
)
def test_bind_round_trip(
    portal: str, stmt: str, params: list[bytes | None], mode: str, rf: list[int]
) -> None:
    pf = {"none": [], "one": [1], "each": [0] * len(params)}[mode]
    raw = m.bind_message(portal, stmt, params, param_formats=pf, result_formats=rf)
    msg_type, payload = frame_one_frontend(raw)
    assert msg_type == ord("B")
    assert m.parse_bind(payload) == m.BindMsg(portal, stmt)


def test_bind_accepts_more_than_32767_params() -> None:
    raw = m.bind_message("", "s", [None] * 40000)
    assert m.parse_bind(raw[5:]) == m.BindMsg("", "s")


@given(st.sampled_from(["S", "P"]), NAME)
def test_describe_and_close_round_trip(kind: Any, name: str) -> None:
    msg_type, payload = frame_one_frontend(m.describe_message(kind, name))
    assert msg_type == ord("D")
    assert m.parse_describe(payload) == m.DescribeMsg(kind, name)
    msg_type, payload = frame_one_frontend(m.close_message(kind, name))
    assert msg_type == ord("C")
    assert m.parse_close(payload) == m.CloseMsg(kind, name)


@given(NAME, st.integers(-(2**31), 2**31 - 1))
def test_execute_round_trip(portal: str, max_rows: int) -> None:
    msg_type, payload = frame_one_frontend(m.execute_message(portal, max_rows))
    assert msg_type == ord("E")
    assert m.parse_execute(payload) == m.ExecuteMsg(portal, max_rows)


@given(st.integers(0, 2**32 - 1), st.lists(st.one_of(st.none(), st.binary(max_size=10))))
def test_function_call_round_trip(oid: int, args: list[bytes | None]) -> None:
    msg_type, payload = frame_one_frontend(m.function_call_message(oid, args))
    assert msg_type == ord("F")
    assert m.parse_function_call(payload) == oid


@given(NAME, st.one_of(st.none(), st.binary(max_size=100)))
def test_sasl_initial_response_round_trip(mech: str, data: bytes | None) -> None:
    msg_type, payload = frame_one_frontend(m.sasl_initial_response(mech, data))
    assert msg_type == ord("p")
    assert m.parse_sasl_initial_response(payload) == (mech, data)


@given(NO_NUL)
def test_password_and_copy_fail_round_trip(text: str) -> None:
    assert m.parse_password(frame_one_frontend(m.password_message(text))[1]) == text
    assert m.parse_copy_fail(frame_one_frontend(m.copy_fail(text))[1]) == text


def test_fixed_frontend_messages() -> None:
    assert frame_one_frontend(m.sync()) == (ord("S"), b"")
    assert frame_one_frontend(m.flush()) == (ord("H"), b"")
    assert frame_one_frontend(m.terminate()) == (ord("X"), b"")
    assert m.sasl_response(b"abc") == b"p\x00\x00\x00\x07abc"


def test_builders_reject_embedded_nul() -> None:
    with pytest.raises(ValueError):
        m.query("select 1\x00; drop table x")
    with pytest.raises(ValueError):
        m.startup_message({"user": "a\x00b"})
    with pytest.raises(ValueError):
        m.startup_message({"": "x"})


# --------------------------------------------------------------------------------------------
# Backend round trips
# --------------------------------------------------------------------------------------------


def test_authentication_messages() -> None:
    assert m.parse_authentication(frame_one_backend(m.authentication_ok())[1]) == (0, b"")
    assert m.parse_authentication(m.authentication_cleartext()[5:]) == (3, b"")
    assert m.parse_authentication(m.authentication_md5(b"salt")[5:]) == (5, b"salt")
    code, data = m.parse_authentication(m.authentication_sasl(["SCRAM-SHA-256", "X"])[5:])
    assert code == 10 and m.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256", "X"]
    assert m.parse_authentication(m.authentication_sasl_continue(b"r=a")[5:]) == (11, b"r=a")
    assert m.parse_authentication(m.authentication_sasl_final(b"v=b")[5:]) == (12, b"v=b")


def test_authentication_malformed() -> None:
    for bad in (b"", b"\x00\x00", b"\x00\x00\x00\x05abc", b"\x00\x00\x00\x00x"):
        with pytest.raises(ProtocolError):
            m.parse_authentication(bad)
    with pytest.raises(ProtocolError):
        m.parse_authentication(b"\x00\x00\x00\x0aSCRAM-SHA-256\x00")  # no list terminator


@given(NAME.filter(bool), NO_NUL)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    msg_type, payload = frame_one_backend(m.parameter_status(name, value))
    assert msg_type == ord("S")
    assert m.parse_parameter_status(payload) == (name, value)


@given(st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=256))
def test_backend_key_data_round_trip(pid: int, key: bytes) -> None:
    assert m.parse_backend_key_data(frame_one_backend(m.backend_key_data(pid, key))[1]) == (
        pid,
        key,
    )


@pytest.mark.parametrize("key", [b"", b"abc", b"x" * 257])
def test_backend_key_data_bad_key(key: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_backend_key_data(struct.pack("!i", 1) + key)
    with pytest.raises(ValueError):
        m.backend_key_data(1, key)


def test_ready_for_query() -> None:
    for status in (b"I", b"T", b"E"):
        assert m.parse_ready_for_query(frame_one_backend(m.ready_for_query(status))[1]) == status
    for bad in (b"", b"X", b"II"):
        with pytest.raises(ProtocolError):
            m.parse_ready_for_query(bad)
    with pytest.raises(ValueError):
        m.ready_for_query(b"Q")


@given(NO_NUL, st.one_of(st.none(), st.text(max_size=20)), st.one_of(st.none(), NO_NUL))
def test_error_response_round_trip(message: str, detail: str | None, hint: str | None) -> None:
    raw = m.error_response("ERROR", "42501", message, detail=detail, hint=hint)
    msg_type, payload = frame_one_backend(raw)
    assert msg_type == ord("E")
    fields = m.parse_error_fields(payload)
    assert fields["S"] == fields["V"] == "ERROR"
    assert fields["C"] == "42501"
    assert fields["M"] == message
    if detail is not None:
        # NUL cannot travel inside a field, so builders replace it.
        assert fields["D"] == detail.replace("\x00", "\ufffd")
    assert fields.get("H") == hint


def test_error_response_fatal_and_notice() -> None:
    fields = m.parse_error_fields(m.error_response("ERROR", "28P01", "x", fatal=True)[5:])
    assert fields["S"] == "FATAL"
    raw = m.notice_response("WARNING", "01000", "careful")
    assert raw[:1] == b"N"
    assert m.parse_error_fields(raw[5:])["S"] == "WARNING"
    with pytest.raises(ValueError):
        m.error_response("ERROR", "4250", "bad sqlstate")


def test_error_fields_tolerant_decoding_and_unknown_codes() -> None:
    payload = b"SERROR\x00Zfuture\x00M\xff\xfe bad\x00\x00"
    fields = m.parse_error_fields(payload)
    assert fields["Z"] == "future"
    assert fields["M"].endswith(" bad") and "\ufffd" in fields["M"]
    for bad in (b"", b"SERROR\x00", b"SERROR", b"SERROR\x00\x00x"):
        with pytest.raises(ProtocolError):
            m.parse_error_fields(bad)


ERROR_FIELD = st.tuples(
    st.sampled_from(b"SVCMDHWPZ"), st.binary(max_size=12).map(lambda b: b.replace(b"\0", b""))
)


@given(st.lists(ERROR_FIELD, max_size=6), st.binary(max_size=3))
def test_error_essentials_reads_what_parse_error_fields_reads(
    fields: list[tuple[int, bytes]], tail: bytes
) -> None:
    """The relay's per-error fast path (review 25: it does not copy or decode the fields it
    does not need) accepts and reads exactly what the full parser does."""
    for payload in (b"".join(bytes([c]) + v + b"\0" for c, v in fields) + b"\0", tail):
        try:
            full = m.parse_error_fields(payload)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                m.error_essentials(payload)
            continue
        severity = full.get("V", full.get("S", ""))
        assert m.error_essentials(payload) == (severity, full.get("C", ""))


def test_error_severity_is_read_untranslated() -> None:
    """Under lc_messages = 'ru_RU' PostgreSQL sends a Russian S for FATAL: the relay read S, so
    a FATAL went unrecognised (the session was not ended, its statements not settled). V is
    the untranslated severity (PostgreSQL 9.6+); S alone is still read (older servers)."""
    fatal_ru = "\u0412\u0410\u0416\u041d\u041e"  # "VAZHNO", Russian for FATAL
    payload = f"S{fatal_ru}\0VFATAL\0C57P01\0Mterminating connection\0\0".encode()
    assert m.error_essentials(payload) == ("FATAL", "57P01")
    without_v = f"S{fatal_ru}\0C57P01\0Mterminating connection\0\0".encode()
    assert m.error_essentials(without_v) == (fatal_ru, "57P01")  # nothing better to go on


@pytest.mark.parametrize(
    ("tag", "rows"),
    [
        ("SELECT 5", 5),
        ("INSERT 0 3", 3),
        ("UPDATE 2", 2),
        ("DELETE 0", 0),
        ("COPY 10", 10),
        ("MERGE 1", 1),
        ("FETCH 3", 3),
        ("MOVE 1", 1),
        ("CREATE TABLE", None),
        ("BEGIN", None),
        ("SELECT", None),
        ("SELECT \uff15", None),
        ("", None),
    ],
)
def test_command_complete(tag: str, rows: int | None) -> None:
    assert m.parse_command_complete(frame_one_backend(m.command_complete(tag))[1]) == (tag, rows)


def test_command_complete_malformed() -> None:
    for bad in (b"", b"SELECT 1", b"SELECT 1\x00x"):
        with pytest.raises(ProtocolError):
            m.parse_command_complete(bad)


def test_negotiate_protocol_version() -> None:
    raw = m.negotiate_protocol_version(0, ["_pq_.x"])
    # The whole version (3.0 = 196608), as PostgreSQL sends it; libpq reads 0 as protocol 0.0.
    assert raw == b"v" + struct.pack("!Iii", 4 + 8 + 7, 3 << 16, 1) + b"_pq_.x\x00"


# --------------------------------------------------------------------------------------------
# Malformed frontend bodies
# --------------------------------------------------------------------------------------------


def startup_body(rest: bytes, protocol: int = 196608) -> bytes:
    return struct.pack("!I", protocol) + rest


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (startup_body(b"user\x00a\x00"), "terminated"),  # no final terminator
        (startup_body(b"user\x00a"), "terminated"),
        (startup_body(b"user\x00a\x00user\x00b\x00\x00"), "duplicate"),
        (startup_body(b"user\x00a\x00\x00x"), "trailing"),
        (startup_body(b"user\x00\xff\x00\x00"), "utf-8"),
        (startup_body(b"\x00", 4 << 16), r"4\.0"),
        (startup_body(b"\x00", 2 << 16), r"2\.0"),
        (startup_body(b""), "terminated"),
        (b"\x00\x03", "truncated"),
        (struct.pack("!II", 80877103, 1), "trailing"),
        (struct.pack("!Ii", 80877102, 1) + b"abc", "cancel key"),
    ],
)
def test_startup_malformed(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        m.parse_startup_packet(payload)


def test_startup_newer_minor_version_is_accepted_for_negotiation() -> None:
    # 3.2 is parsed; the server side answers NegotiateProtocolVersion and speaks 3.0.
    parsed = m.parse_startup_packet(startup_body(b"user\x00a\x00\x00", 3 << 16 | 2))
    assert isinstance(parsed, m.StartupMessage)
    assert parsed.protocol == 3 << 16 | 2 and parsed.params == {"user": "a"}


def test_startup_empty_key_terminates_so_value_is_trailing() -> None:
    # An empty key is the list terminator, so a value after it is trailing garbage.
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(startup_body(b"\x00x\x00\x00"))


def test_startup_too_many_params() -> None:
    body = b"".join(b"k%d\x00v\x00" % i for i in range(65)) + b"\x00"
    with pytest.raises(ProtocolError, match="more than 64"):
        m.parse_startup_packet(startup_body(body))
    body = b"".join(b"k%d\x00v\x00" % i for i in range(64)) + b"\x00"
    startup = m.parse_startup_packet(startup_body(body))
    assert isinstance(startup, m.StartupMessage) and len(startup.params) == 64


@pytest.mark.parametrize(
    ("parser", "payload"),
    [
        (m.parse_query, b"select 1"),
        (m.parse_query, b"select 1\x00\x00"),
        (m.parse_query, b"\xff\x00"),
        (m.parse_parse, b"name\x00select 1"),
        (m.parse_parse, b"name\x00select 1\x00"),
        (m.parse_parse, b"name\x00select 1\x00\x00\x02\x00\x00\x00\x17"),
        (m.parse_parse, b"name\x00select 1\x00\x00\x00extra"),
        (m.parse_bind, b"p\x00"),
        (m.parse_bind, b"p\x00s\x00"),
        (m.parse_bind, b"p\x00s\x00\x00\x00\x00\x01"),
        (m.parse_bind, b"p\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),
        (m.parse_bind, b"p\x00s\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),
        (m.parse_bind, b"p\x00s\x00\x00\x02\x00\x00\x00\x00"),
        (m.parse_bind, b"p\x00s\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00"),  # 2 fmts, 0 params
        (m.parse_bind, b"p\x00s\x00\x00\x00\x00\x00\x00\x00x"),
        (m.parse_describe, b"X\x00"),
        (m.parse_describe, b"S"),
        (m.parse_describe, b""),
        (m.parse_close, b"Pname"),
        (m.parse_execute, b"p\x00\x00\x00"),
        (m.parse_execute, b"p\x00\x00\x00\x00\x00\x00"),
        (m.parse_function_call, b"\x00\x00\x00"),
        (m.parse_function_call, b"\x00\x00\x00\x01\x00\x00\x00\x00"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256\x00\xff\xff\xff\xfe"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256\x00\xff\xff\xff\xffx"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256"),
        (m.parse_password, b"secret"),
        (m.parse_copy_fail, b""),
    ],
)
def test_frontend_malformed(parser: Callable[[bytes], object], payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parser(payload)


ALL_PARSERS: list[Callable[[bytes], object]] = [
    m.parse_startup_packet,
    m.parse_query,
    m.parse_parse,
    m.parse_bind,
    m.parse_describe,
    m.parse_execute,
    m.parse_close,
    m.parse_function_call,
    m.parse_sasl_initial_response,
    m.parse_password,
    m.parse_copy_fail,
    m.parse_authentication,
    m.parse_sasl_mechanisms,
    m.parse_error_fields,
    m.error_essentials,
    m.parse_command_complete,
    m.parse_backend_key_data,
    m.parse_ready_for_query,
    m.parse_parameter_status,
    m.parse_parts,
    m.execute_parts,
    m.check_describe,
    m.bind_names,
]


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.__name__)
@given(data=st.binary(max_size=200))
def test_parsers_raise_only_protocol_error(parser: Callable[[bytes], object], data: bytes) -> None:
    try:
        parser(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.__name__)
@given(data=st.binary(max_size=60), prefix=st.sampled_from([b"", b"\x00\x03\x00\x00", b"S", b"P"]))
def test_parsers_structured_garbage(
    parser: Callable[[bytes], object], data: bytes, prefix: bytes
) -> None:
    try:
        parser(prefix + data)
    except ProtocolError:
        pass


# The relay's fast paths must accept exactly what the full parsers accept, and agree on what
# they read (names in latin-1: byte for byte).


def _outcome(parser: Callable[[bytes], Any], payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", parser(payload)
    except ProtocolError:
        return "error", None


def _full_parse(payload: bytes) -> Any:
    parsed = m.parse_parse(payload, "latin-1")
    return parsed.name, parsed.query.encode("latin-1")


def _full_execute(payload: bytes) -> Any:
    parsed = m.parse_execute(payload, "latin-1")
    return parsed.portal, parsed.max_rows


def _full_describe(payload: bytes) -> None:
    m.parse_describe(payload, "latin-1")


FAST_AND_FULL = [
    (m.parse_parts, _full_parse),
    (m.execute_parts, _full_execute),
    (m.check_describe, _full_describe),
]

_NAME_BYTES = st.binary(max_size=8).map(lambda b: b.replace(b"\x00", b""))
WELL_FORMED = st.one_of(
    st.builds(
        lambda n, t, o: m.parse_message(n, t, o)[5:],
        NAME,
        NO_NUL,
        st.lists(st.integers(0, 2**32 - 1), max_size=4),
    ),
    st.builds(lambda p, r: m.execute_message(p, r)[5:], NAME, st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda k, n: m.describe_message(k, n)[5:], st.sampled_from(["S", "P"]), NAME),
    # Near misses: right layout, any kind byte, parameter count or tail.
    st.builds(
        lambda n, t, count, tail: n + b"\x00" + t + b"\x00" + count.to_bytes(2, "big") + tail,
        _NAME_BYTES,
        _NAME_BYTES,
        st.integers(0, 3),
        st.binary(max_size=14),
    ),
    st.builds(lambda n, tail: n + b"\x00" + tail, _NAME_BYTES, st.binary(max_size=6)),
    st.builds(lambda k, n: bytes([k]) + n + b"\x00", st.integers(0, 255), _NAME_BYTES),
)


@pytest.mark.parametrize(("fast", "full"), FAST_AND_FULL, ids=lambda f: f.__name__)
@given(
    base=st.one_of(st.binary(max_size=80), WELL_FORMED),
    cut=st.integers(0, 8),
    extra=st.binary(max_size=6),
)
def test_fast_paths_accept_exactly_what_full_parsers_accept(
    fast: Callable[[bytes], Any], full: Callable[[bytes], Any], base: bytes, cut: int, extra: bytes
) -> None:
    for payload in (base, base[: max(0, len(base) - cut)], base + extra):
        assert _outcome(fast, payload) == _outcome(full, payload), payload


@pytest.mark.parametrize("name", [b"", b"p1", b"\xff\xfe"])
def test_check_describe_agrees_for_every_kind_byte(name: bytes) -> None:
    for kind in range(256):
        for payload in (bytes([kind]) + name + b"\x00", bytes([kind]) + name):
            assert _outcome(m.check_describe, payload) == _outcome(_full_describe, payload)


def test_every_client_encoding_dbward_decodes_reads_ascii_as_ascii() -> None:
    """Quotes, backslashes and escapes are ASCII: a codec that reads 0x5C as anything but a
    backslash (Python's shift_jis_2004 reads "¥") would let text mean one thing to dbward and
    another to PostgreSQL."""
    from dbward.wire.postgres.encodings import _CODECS

    ascii_bytes = bytes(range(128))
    for name, codec in _CODECS.items():
        assert ascii_bytes.decode(codec) == ascii_bytes.decode("ascii"), name
