"""Parse and build PostgreSQL v3 message bodies in both directions (pure functions, no I/O)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from dbward.core.errors import ProtocolError
from dbward.core.text import capped
from dbward.wire.postgres.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)

MAX_STARTUP_PARAMS: Final = 64
MIN_CANCEL_KEY_BYTES: Final = 4
# Protocol 3.2 (PostgreSQL 18) allows cancel keys up to 256 bytes.
MAX_CANCEL_KEY_BYTES: Final = 256

_I16: Final = struct.Struct("!h")
_U16: Final = struct.Struct("!H")
_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")

AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# Command tags whose last word is a row count (INSERT also carries a legacy OID before it).
_ROW_COUNT_TAGS: Final = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE"}
)


# --------------------------------------------------------------------------------------------
# Parsed message types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first message of a session: protocol version and connection parameters."""

    protocol: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks to switch to TLS before the startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption before the startup message."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Out-of-band request to cancel the query running on the session (pid, secret key)."""

    pid: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ParseMsg:
    """Parse: create a prepared statement (empty name: the unnamed statement)."""

    name: str
    query: str
    param_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BindMsg:
    """Bind: create a portal from a prepared statement (parameters are not decoded)."""

    portal: str
    statement: str


@dataclass(frozen=True, slots=True)
class DescribeMsg:
    """Describe a prepared statement ('S') or a portal ('P')."""

    kind: Literal["S", "P"]
    name: str


@dataclass(frozen=True, slots=True)
class ExecuteMsg:
    """Execute a portal, returning at most max_rows rows (0 or less: all)."""

    portal: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class CloseMsg:
    """Close a prepared statement ('S') or a portal ('P')."""

    kind: Literal["S", "P"]
    name: str


# --------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------


class _Reader:
    """Cursor over a message body; every shortfall becomes a ProtocolError naming the message."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"invalid {self.what} message: {problem}")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def cstring_bytes(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self.fail("string is not NUL-terminated")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return raw

    def cstring(self, encoding: str = "utf-8") -> str:
        return _decode(self.cstring_bytes(), encoding, self.what)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def int16(self) -> int:
        if self.remaining() < 2:
            raise self.fail("truncated")
        value: int = _I16.unpack_from(self.data, self.pos)[0]
        self.pos += 2
        return value

    def uint16(self) -> int:
        if self.remaining() < 2:
            raise self.fail("truncated")
        value: int = _U16.unpack_from(self.data, self.pos)[0]
        self.pos += 2
        return value

    def int32(self) -> int:
        if self.remaining() < 4:
            raise self.fail("truncated")
        value: int = _I32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return value

    def uint32(self) -> int:
        if self.remaining() < 4:
            raise self.fail("truncated")
        value: int = _U32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return value

    def take(self, count: int) -> bytes:
        if count < 0 or self.remaining() < count:
            raise self.fail("truncated")
        value = self.data[self.pos : self.pos + count]
        self.pos += count
        return value

    def skip(self, count: int) -> None:
        # Check the length before moving: nothing is copied for skipped values.
        if count < 0 or self.remaining() < count:
            raise self.fail("truncated")
        self.pos += count

    def rest(self) -> bytes:
        value = self.data[self.pos :]
        self.pos = len(self.data)
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{self.remaining()} unexpected trailing bytes")


def _decode(raw: bytes, encoding: str, what: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid {what} message: invalid {encoding} text") from exc


def _kind(reader: _Reader) -> Literal["S", "P"]:
    kind = reader.byte()
    if kind == 0x53:  # 'S'
        return "S"
    if kind == 0x50:  # 'P'
        return "P"
    raise reader.fail(f"invalid target type 0x{kind:02x} (expected 'S' or 'P')")


# PostgreSQL reads the Int16 counts of Parse, Bind and FunctionCall as unsigned (up to 65535).


def _skip_formats(reader: _Reader) -> int:
    count = reader.uint16()
    reader.skip(2 * count)
    return count


def _skip_values(reader: _Reader) -> int:
    count = reader.uint16()
    for _ in range(count):
        size = reader.int32()
        if size < -1:
            raise reader.fail(f"invalid value length {size}")
        if size > 0:
            reader.skip(size)
    return count


# --------------------------------------------------------------------------------------------
# Frontend parsing (client -> proxy)
# --------------------------------------------------------------------------------------------


def parse_startup_packet(
    payload: bytes,
) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    """Parse a startup-phase packet body (everything after the length word)."""
    reader = _Reader(payload, "startup packet")
    code = reader.uint32()
    if code == SSL_REQUEST_CODE:
        reader.end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        reader.end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        reader.what = "cancel request"
        pid = reader.int32()
        key = reader.rest()
        if not MIN_CANCEL_KEY_BYTES <= len(key) <= MAX_CANCEL_KEY_BYTES:
            raise reader.fail(f"invalid cancel key length {len(key)}")
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        # A newer 3.x minor is accepted here and negotiated down to 3.0 by the server side
        # (NegotiateProtocolVersion), as PostgreSQL does; another major version is refused.
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
        )
    params: dict[str, str] = {}
    while True:
        name_raw = reader.cstring_bytes()
        if not name_raw:
            break
        if len(params) >= MAX_STARTUP_PARAMS:
            raise reader.fail(f"more than {MAX_STARTUP_PARAMS} parameters")
        name = _decode(name_raw, "utf-8", reader.what)
        if name in params:
            raise reader.fail(f"duplicate parameter {capped(name)!r}")
        params[name] = reader.cstring("utf-8")
    # PostgreSQL: "expected terminator as last byte"; anything after it is a layout error.
    reader.end()
    return StartupMessage(code, params)


def parse_query(payload: bytes, encoding: str = "utf-8") -> str:
    """Query ('Q'): the SQL text."""
    reader = _Reader(payload, "Query")
    text = reader.cstring(encoding)
    reader.end()
    return text


def parse_parse(payload: bytes, encoding: str = "utf-8") -> ParseMsg:
    """Parse ('P'): statement name, SQL text and parameter type OIDs."""
    reader = _Reader(payload, "Parse")
    name = reader.cstring(encoding)
    query_text = reader.cstring(encoding)
    count = reader.uint16()
    if reader.remaining() != 4 * count:
        raise reader.fail("parameter type list does not match its count")
    oids = struct.unpack_from(f"!{count}I", payload, reader.pos)
    return ParseMsg(name, query_text, oids)


def parse_parts(payload: bytes) -> tuple[str, bytes]:
    """Parse's statement name (latin-1, so byte for byte) and raw SQL bytes: the relay's fast path.

    Accepts exactly what `parse_parse` accepts (two NUL-terminated strings, then a parameter
    type list that matches its count) without building the message or decoding the SQL twice.
    """
    first = payload.find(b"\x00")
    second = payload.find(b"\x00", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("invalid Parse message: string is not NUL-terminated")
    rest = len(payload) - second - 1
    if rest < 2:
        raise ProtocolError("invalid Parse message: truncated")
    count = payload[second + 1] << 8 | payload[second + 2]
    if rest - 2 != 4 * count:
        raise ProtocolError("invalid Parse message: parameter type list does not match its count")
    return payload[:first].decode("latin-1"), payload[first + 1 : second]


def parse_bind(payload: bytes, encoding: str = "utf-8") -> BindMsg:
    """Bind ('B'): portal and statement names; the rest is only checked for well-formedness."""
    reader = _Reader(payload, "Bind")
    portal = reader.cstring(encoding)
    statement = reader.cstring(encoding)
    formats = _skip_formats(reader)
    params = _skip_values(reader)
    if formats not in (0, 1, params):
        raise reader.fail(f"{formats} parameter formats but {params} parameters")
    _skip_formats(reader)
    reader.end()
    return BindMsg(portal, statement)


def bind_names(payload: bytes, encoding: str = "utf-8") -> tuple[str, str]:
    """Bind's portal and statement names only: the relay's per-message fast path.

    The parameters are left for PostgreSQL to validate (dbward never interprets them);
    `parse_bind` checks the whole message.
    """
    first = payload.find(b"\x00")
    second = payload.find(b"\x00", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("invalid Bind message: missing NUL terminator")
    try:
        return payload[:first].decode(encoding), payload[first + 1 : second].decode(encoding)
    except UnicodeDecodeError:
        raise ProtocolError(f"invalid Bind message: name is not valid {encoding}") from None


def check_describe(payload: bytes) -> None:
    """Describe's shape only (the relay forwards it untouched): what `parse_describe` accepts."""
    if (
        len(payload) < 2
        or payload[0] not in (0x53, 0x50)
        or payload.find(b"\x00") != len(payload) - 1
    ):
        parse_describe(payload, "latin-1")  # raises with the precise reason


def parse_describe(payload: bytes, encoding: str = "utf-8") -> DescribeMsg:
    """Describe ('D'): what to describe and its name."""
    reader = _Reader(payload, "Describe")
    kind = _kind(reader)
    name = reader.cstring(encoding)
    reader.end()
    return DescribeMsg(kind, name)


def parse_execute(payload: bytes, encoding: str = "utf-8") -> ExecuteMsg:
    """Execute ('E'): portal name and row limit."""
    reader = _Reader(payload, "Execute")
    portal = reader.cstring(encoding)
    max_rows = reader.int32()
    reader.end()
    return ExecuteMsg(portal, max_rows)


def execute_parts(payload: bytes) -> tuple[str, int]:
    """Execute's portal name (latin-1) and row limit: the relay's fast path.

    Accepts exactly what `parse_execute` accepts.
    """
    end = payload.find(b"\x00")
    if end < 0 or len(payload) - end != 5:
        message = parse_execute(payload, "latin-1")  # raises with the precise reason
        return message.portal, message.max_rows
    return payload[:end].decode("latin-1"), _I32.unpack_from(payload, end + 1)[0]


def parse_close(payload: bytes, encoding: str = "utf-8") -> CloseMsg:
    """Close ('C'): what to close and its name."""
    reader = _Reader(payload, "Close")
    kind = _kind(reader)
    name = reader.cstring(encoding)
    reader.end()
    return CloseMsg(kind, name)


def parse_function_call(payload: bytes) -> int:
    """FunctionCall ('F'): the OID of the function to call (arguments are only validated)."""
    reader = _Reader(payload, "FunctionCall")
    oid = reader.uint32()
    formats = _skip_formats(reader)
    args = _skip_values(reader)
    if formats not in (0, 1, args):
        raise reader.fail(f"{formats} argument formats but {args} arguments")
    reader.int16()  # result format code
    reader.end()
    return oid


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes | None]:
    """SASLInitialResponse ('p'): mechanism name and initial data (None when absent)."""
    reader = _Reader(payload, "SASLInitialResponse")
    mechanism = reader.cstring("utf-8")
    size = reader.int32()
    if size == -1:
        reader.end()
        return mechanism, None
    if size < -1:
        raise reader.fail(f"invalid data length {size}")
    data = reader.take(size)
    reader.end()
    return mechanism, data


def parse_password(payload: bytes, encoding: str = "utf-8") -> str:
    """PasswordMessage ('p'): a cleartext or md5-hashed password."""
    reader = _Reader(payload, "PasswordMessage")
    text = reader.cstring(encoding)
    reader.end()
    return text


def parse_copy_fail(payload: bytes, encoding: str = "utf-8") -> str:
    """CopyFail ('f'): the client's reason for aborting COPY FROM STDIN."""
    reader = _Reader(payload, "CopyFail")
    text = reader.cstring(encoding)
    reader.end()
    return text


# --------------------------------------------------------------------------------------------
# Backend parsing (upstream -> proxy)
# --------------------------------------------------------------------------------------------


def parse_authentication(payload: bytes) -> tuple[int, bytes]:
    """Authentication ('R'): request code and the code-specific data."""
    reader = _Reader(payload, "Authentication")
    code = reader.int32()
    data = reader.rest()
    if code in (AUTH_OK, AUTH_KERBEROS_V5, AUTH_CLEARTEXT, AUTH_GSS, AUTH_SSPI) and data:
        raise reader.fail(f"unexpected data for request {code}")
    if code == AUTH_MD5 and len(data) != 4:
        raise reader.fail("MD5 salt must be 4 bytes")
    if code == AUTH_SASL:
        parse_sasl_mechanisms(data)
    return code, data


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    """The data of AuthenticationSASL: NUL-terminated mechanism names, then an empty one."""
    reader = _Reader(data, "AuthenticationSASL")
    names: list[str] = []
    while True:
        name = reader.cstring("utf-8")
        if not name:
            break
        names.append(name)
    reader.end()
    return names


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse ('E'/'N'): field code -> value (the database is trusted)."""
    reader = _Reader(payload, "ErrorResponse")
    fields: dict[str, str] = {}
    while True:
        code = reader.byte()
        if code == 0:
            break
        fields[chr(code)] = reader.cstring_bytes().decode("utf-8", "replace")
    reader.end()
    return fields


def error_essentials(payload: bytes, what: str = "ErrorResponse") -> tuple[str, str]:
    """ErrorResponse: (severity, SQLSTATE 'C'), the relay's per-error path. The severity is
    the untranslated 'V' field when there is one (PostgreSQL 9.6+), else 'S', which follows
    lc_messages ("FATAL" may arrive as "ВАЖНО"). Accepts what `parse_error_fields` accepts,
    without copying or decoding the other fields: an error can quote a value of up to 1 GB
    (`select repeat('x', n)::int`), which decoding cost twice its size again.

    NoticeResponse has the same body (`what` names the message in the ProtocolError): the
    relay checks notices with this too."""
    severity = sqlstate = ""
    untranslated: str | None = None
    size = len(payload)
    pos = 0
    while True:
        if pos >= size:
            raise ProtocolError(f"invalid {what} message: truncated")
        code = payload[pos]
        if code == 0:
            break
        end = payload.find(b"\x00", pos + 1)
        if end < 0:
            raise ProtocolError(f"invalid {what} message: string is not NUL-terminated")
        if code == 0x53:  # S
            severity = payload[pos + 1 : end].decode("utf-8", "replace")
        elif code == 0x56:  # V
            untranslated = payload[pos + 1 : end].decode("utf-8", "replace")
        elif code == 0x43:  # C
            sqlstate = payload[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    if pos + 1 != size:
        raise ProtocolError(f"invalid {what} message: {size - pos - 1} unexpected trailing bytes")
    return (untranslated if untranslated is not None else severity), sqlstate


def parse_command_complete(payload: bytes) -> tuple[str, int | None]:
    """CommandComplete ('C'): the tag and, for row-returning commands, the row count."""
    reader = _Reader(payload, "CommandComplete")
    tag = reader.cstring_bytes().decode("utf-8", "replace")
    reader.end()
    words = tag.split(" ")
    rows: int | None = None
    if len(words) >= 2 and words[0] in _ROW_COUNT_TAGS and words[-1].isascii():
        last = words[-1]
        if last.isdigit():
            rows = int(last)
    return tag, rows


_ROW_COUNT_TAGS_BYTES = frozenset(tag.encode() for tag in _ROW_COUNT_TAGS)


def command_complete_rows(payload: bytes) -> int | None:
    """The row count of a CommandComplete body, or None: the per-statement fast path."""
    end = payload.find(b"\x00")
    tag = payload[:end] if end >= 0 else payload
    space = tag.rfind(b" ")
    if space < 0:
        return None
    last = tag[space + 1 :]
    if last.isdigit() and tag[: tag.find(b" ")] in _ROW_COUNT_TAGS_BYTES:
        return int(last)
    return None


def parse_backend_key_data(payload: bytes) -> tuple[int, bytes]:
    """BackendKeyData ('K'): process id and cancel key (4 bytes in 3.0, up to 256 in 3.2)."""
    reader = _Reader(payload, "BackendKeyData")
    pid = reader.int32()
    key = reader.rest()
    if not MIN_CANCEL_KEY_BYTES <= len(key) <= MAX_CANCEL_KEY_BYTES:
        raise reader.fail(f"invalid cancel key length {len(key)}")
    return pid, key


def parse_ready_for_query(payload: bytes) -> bytes:
    """ReadyForQuery ('Z'): transaction status b'I', b'T' or b'E'."""
    if payload not in (b"I", b"T", b"E"):
        raise ProtocolError("invalid ReadyForQuery message: bad transaction status")
    return payload


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    """ParameterStatus ('S'): a run-time parameter's name and value."""
    reader = _Reader(payload, "ParameterStatus")
    name = reader.cstring_bytes().decode("utf-8", "replace")
    value = reader.cstring_bytes().decode("utf-8", "replace")
    reader.end()
    return name, value


# --------------------------------------------------------------------------------------------
# Building helpers
# --------------------------------------------------------------------------------------------


def _frame(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + _U32.pack(len(body) + 4) + body


def _cstr(text: str, encoding: str = "utf-8") -> bytes:
    raw = text.encode(encoding)
    if b"\x00" in raw:
        # An embedded NUL would end the string early and desynchronise the stream.
        raise ValueError("string contains a NUL character")
    return raw + b"\x00"


def _safe_cstr(text: str) -> bytes:
    # Error texts may echo identity names or other external data; never fail while reporting.
    return text.replace("\x00", "\N{REPLACEMENT CHARACTER}").encode("utf-8", "replace") + b"\x00"


def _int16_count(count: int, what: str) -> bytes:
    if not 0 <= count <= 65535:
        raise ValueError(f"too many {what}: {count}")
    return _U16.pack(count)


# --------------------------------------------------------------------------------------------
# Backend building (proxy as server)
# --------------------------------------------------------------------------------------------


def authentication_ok() -> bytes:
    """AuthenticationOk."""
    return _frame(b"R", _I32.pack(AUTH_OK))


def authentication_cleartext() -> bytes:
    """AuthenticationCleartextPassword."""
    return _frame(b"R", _I32.pack(AUTH_CLEARTEXT))


def authentication_md5(salt: bytes) -> bytes:
    """AuthenticationMD5Password with a 4-byte salt."""
    if len(salt) != 4:
        raise ValueError("MD5 salt must be 4 bytes")
    return _frame(b"R", _I32.pack(AUTH_MD5) + salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    """AuthenticationSASL listing the offered mechanisms."""
    if not mechanisms:
        raise ValueError("at least one SASL mechanism is required")
    body = b"".join(_cstr(name) for name in mechanisms) + b"\x00"
    return _frame(b"R", _I32.pack(AUTH_SASL) + body)


def authentication_sasl_continue(data: bytes) -> bytes:
    """AuthenticationSASLContinue carrying a server challenge."""
    return _frame(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    """AuthenticationSASLFinal carrying the server's final message."""
    return _frame(b"R", _I32.pack(AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus."""
    return _frame(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    """BackendKeyData (key: 4 bytes for protocol 3.0)."""
    if not MIN_CANCEL_KEY_BYTES <= len(key) <= MAX_CANCEL_KEY_BYTES:
        raise ValueError(f"invalid cancel key length {len(key)}")
    return _frame(b"K", _I32.pack(pid) + key)


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery with transaction status b'I' (idle), b'T' (in block) or b'E' (failed)."""
    if status not in (b"I", b"T", b"E"):
        raise ValueError(f"invalid transaction status {status!r}")
    return _frame(b"Z", status)


def _fields_body(
    severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"invalid SQLSTATE {sqlstate!r}")
    parts = [
        b"S" + _safe_cstr(severity),
        b"V" + _safe_cstr(severity),
        b"C" + _safe_cstr(sqlstate),
        b"M" + _safe_cstr(message),
    ]
    if detail is not None:
        parts.append(b"D" + _safe_cstr(detail))
    if hint is not None:
        parts.append(b"H" + _safe_cstr(hint))
    parts.append(b"\x00")
    return b"".join(parts)


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    fatal: bool = False,
) -> bytes:
    """ErrorResponse; `fatal=True` forces severity FATAL (the session ends after it)."""
    if fatal:
        severity = "FATAL"
    return _frame(b"E", _fields_body(severity, sqlstate, message, detail, hint))


def notice_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """NoticeResponse (severity such as WARNING, NOTICE, INFO)."""
    return _frame(b"N", _fields_body(severity, sqlstate, message, detail, hint))


def command_complete(tag: str) -> bytes:
    """CommandComplete."""
    return _frame(b"C", _cstr(tag))


def negotiate_protocol_version(minor: int, unsupported_options: Sequence[str] = ()) -> bytes:
    """NegotiateProtocolVersion: the newest 3.x version supported, and the options not recognised.

    The field holds the whole version number (major << 16 | minor), as PostgreSQL sends it and
    libpq reads it: a bare minor (0) reads as protocol 0.0, a "downgrade to pre-3.0" that
    libpq 18 refuses (`max_protocol_version=3.2`/`latest` could not connect).
    """
    body = _I32.pack(3 << 16 | minor) + _I32.pack(len(unsupported_options))
    body += b"".join(_cstr(option) for option in unsupported_options)
    return _frame(b"v", body)


def empty_query_response() -> bytes:
    """EmptyQueryResponse."""
    return _frame(b"I", b"")


def data_row(values: Sequence[bytes | None]) -> bytes:
    """DataRow from already-encoded column values (None: SQL NULL)."""
    parts = [_int16_count(len(values), "columns")]
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(value)))
            parts.append(value)
    return _frame(b"D", b"".join(parts))


def copy_data(data: bytes) -> bytes:
    """CopyData (same format in both directions)."""
    return _frame(b"d", data)


def copy_done() -> bytes:
    """CopyDone (same format in both directions)."""
    return _frame(b"c", b"")


# --------------------------------------------------------------------------------------------
# Frontend building (proxy as client of the upstream)
# --------------------------------------------------------------------------------------------


def startup_message(params: Mapping[str, str]) -> bytes:
    """StartupMessage for protocol 3.0 (no type byte)."""
    body = _U32.pack(PROTOCOL_3_0)
    for name, value in params.items():
        if not name:
            raise ValueError("empty startup parameter name")
        body += _cstr(name) + _cstr(value)
    body += b"\x00"
    return _U32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    """SSLRequest."""
    return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    """GSSENCRequest."""
    return _U32.pack(8) + _U32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: bytes) -> bytes:
    """CancelRequest (sent on a new connection)."""
    if not MIN_CANCEL_KEY_BYTES <= len(key) <= MAX_CANCEL_KEY_BYTES:
        raise ValueError(f"invalid cancel key length {len(key)}")
    body = _U32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + key
    return _U32.pack(len(body) + 4) + body


def password_message(text: str) -> bytes:
    """PasswordMessage (cleartext or "md5..." hash)."""
    return _frame(b"p", _cstr(text))


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """SASLInitialResponse (data None: no initial response)."""
    size = _I32.pack(-1) if data is None else _I32.pack(len(data)) + data
    return _frame(b"p", _cstr(mechanism) + size)


def sasl_response(data: bytes) -> bytes:
    """SASLResponse."""
    return _frame(b"p", data)


def query(text: str, encoding: str = "utf-8") -> bytes:
    """Query (simple protocol)."""
    return _frame(b"Q", _cstr(text, encoding))


def parse_message(
    name: str, query: str, param_oids: Iterable[int] = (), encoding: str = "utf-8"
) -> bytes:
    """Parse."""
    oids = tuple(param_oids)
    body = _cstr(name, encoding) + _cstr(query, encoding) + _int16_count(len(oids), "parameters")
    body += struct.pack(f"!{len(oids)}I", *oids)
    return _frame(b"P", body)


def bind_message(
    portal: str,
    statement: str,
    params: Sequence[bytes | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
    encoding: str = "utf-8",
) -> bytes:
    """Bind with already-encoded parameter values (None: SQL NULL)."""
    parts = [_cstr(portal, encoding), _cstr(statement, encoding)]
    parts.append(_int16_count(len(param_formats), "format codes"))
    parts.extend(_I16.pack(code) for code in param_formats)
    parts.append(_int16_count(len(params), "parameters"))
    for value in params:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(value)))
            parts.append(value)
    parts.append(_int16_count(len(result_formats), "format codes"))
    parts.extend(_I16.pack(code) for code in result_formats)
    return _frame(b"B", b"".join(parts))


def describe_message(kind: Literal["S", "P"], name: str, encoding: str = "utf-8") -> bytes:
    """Describe a statement ('S') or portal ('P')."""
    return _frame(b"D", kind.encode("ascii") + _cstr(name, encoding))


def execute_message(portal: str, max_rows: int = 0, encoding: str = "utf-8") -> bytes:
    """Execute."""
    return _frame(b"E", _cstr(portal, encoding) + _I32.pack(max_rows))


def close_message(kind: Literal["S", "P"], name: str, encoding: str = "utf-8") -> bytes:
    """Close a statement ('S') or portal ('P')."""
    return _frame(b"C", kind.encode("ascii") + _cstr(name, encoding))


def function_call_message(
    oid: int, args: Sequence[bytes | None] = (), *, result_format: int = 0
) -> bytes:
    """FunctionCall with text-format arguments."""
    parts = [_U32.pack(oid), _I16.pack(0), _int16_count(len(args), "arguments")]
    for value in args:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(value)))
            parts.append(value)
    parts.append(_I16.pack(result_format))
    return _frame(b"F", b"".join(parts))


def copy_fail(reason: str) -> bytes:
    """CopyFail."""
    return _frame(b"f", _cstr(reason))


def sync() -> bytes:
    """Sync."""
    return b"S\x00\x00\x00\x04"


def flush() -> bytes:
    """Flush."""
    return b"H\x00\x00\x00\x04"


def terminate() -> bytes:
    """Terminate."""
    return b"X\x00\x00\x00\x04"
