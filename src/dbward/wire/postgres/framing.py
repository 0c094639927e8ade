"""Sans-IO framing of the PostgreSQL v3 byte streams: split into messages, scan without copying."""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

from dbward.core.errors import ProtocolError

__all__ = [
    "BACKEND_TYPES",
    "CANCEL_REQUEST_CODE",
    "FRONTEND_TYPES",
    "GSSENC_REQUEST_CODE",
    "IN_PLACE_MIN_BYTES",
    "MAX_STARTUP_PACKET_LENGTH",
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
    "BackendFramer",
    "BackendScanner",
    "Frame",
    "FrontendFramer",
]

SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
PROTOCOL_3_0: Final = 196608
# PostgreSQL refuses longer startup packets (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET_LENGTH: Final = 10000
_CANCEL_REQUEST_LENGTH: Final = 16
_SPECIAL_MAJOR: Final = 1234  # major half of the SSL/GSSENC/cancel request codes

FRONTEND_TYPES: Final = frozenset(b"QPBEDCHSXdcfFp")
BACKEND_TYPES: Final = frozenset(b"RKSZTDCENAGHWdc123ntIsVv")

_DATA_ROW: Final = ord("D")
_COPY_DATA: Final = ord("d")
# Backend messages whose body the relay needs (to track or to check); others are reported
# without copying the body. A NoticeResponse can quote a value as large as an error's; its body
# is checked all the same (a malformed one ends the session, as a malformed error does).
_PAYLOAD_TYPES: Final = frozenset(b"CEZSKRAGHWvN")

# Backend messages that never have a body: ParseComplete, BindComplete, CloseComplete, NoData,
# EmptyQueryResponse, PortalSuspended, CopyDone (libpq refuses one with a body).
_BODILESS: Final = frozenset(b"123nIsc")

# A client message of this many bytes or more that arrives over several feeds is handed over in
# the buffer it was gathered in (see FrontendFramer.feed). Larger than any message accepted
# before login (64 KiB), so those are always plain bytes.
IN_PLACE_MIN_BYTES: Final = 128 * 1024

# (type byte or 0, payload, raw frame). Payload and frame are bytes, except for a message of
# IN_PLACE_MIN_BYTES or more completed over several feeds: its frame is the bytearray it was
# gathered in and its payload a view of that (nothing is copied; neither is changed afterwards).
Frame: TypeAlias = tuple[int, bytes | memoryview, bytes | bytearray]

# Bound once: `_U32.unpack_from` per feed is a method load CPython 3.11 cannot specialize.
_UNPACK_U32: Final = struct.Struct("!I").unpack_from
_UNPACK_TYPE_LENGTH: Final = struct.Struct("!BI").unpack_from


class FrontendFramer:
    """Split the client-to-proxy byte stream into whole messages.

    The plain attribute `startup` tells whether the next message is a startup-phase packet (no
    type byte). The framer clears it itself after a StartupMessage (so the relay setting it to
    False again is harmless) and leaves it set after SSLRequest/GSSENCRequest/CancelRequest.
    Anything framed or buffered after an SSLRequest that the relay answers with 'S' is
    plaintext injected before the TLS handshake (CVE-2021-23214) and must be refused.
    """

    __slots__ = ("_buf", "_need", "max_message_bytes", "startup")

    def __init__(self, max_message_bytes: int = 256 * 1024 * 1024, *, startup: bool = True) -> None:
        self.max_message_bytes = max_message_bytes
        self.startup = startup
        self._buf = bytearray()
        # Bytes the buffer must hold before the head frame is complete (0: header not seen yet);
        # lets a large message arrive in many small feeds without rescanning the buffer.
        self._need = 0

    @property
    def pending_bytes(self) -> int:
        """Size of the buffered incomplete tail."""
        return len(self._buf)

    def discard(self) -> None:
        """Drop the buffered incomplete tail (the connection is being closed)."""
        self._buf = bytearray()
        self._need = 0

    @property
    def expected_bytes(self) -> int:
        """Size of the unfinished message at the head of the buffer, as its header announced
        it (0 while there is none, or its header is not complete yet)."""
        return self._need

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every complete message as a Frame (type byte or 0, payload, raw)."""
        buf = self._buf
        if not buf and not self.startup and type(data) is bytes:
            return self._feed_fresh(data)
        buf += data
        size = len(buf)
        need = self._need
        if size < need:
            return []
        out: list[Frame] = []
        if need >= IN_PLACE_MIN_BYTES:
            # A large message begun in an earlier feed (so at the start of the buffer) is
            # complete: hand over the buffer itself rather than copy it twice (the frame, then
            # the payload: three times the message in memory at once). What follows it, at most
            # this feed, starts a new buffer.
            rest = buf[need:]
            del buf[need:]
            self._buf = rest
            out.append((buf[0], memoryview(buf)[5:], buf))
            buf = rest
            size = len(buf)
        self._need = 0
        pos = 0
        unpack = _UNPACK_U32
        with memoryview(buf) as view:
            while True:
                if self.startup:
                    if size - pos < 8:
                        # The code word is needed to validate the packet, so wait for it;
                        # a length that no packet can have is refused already.
                        if size - pos >= 4:
                            _check_startup_length(unpack(buf, pos)[0])
                        break
                    length = unpack(buf, pos)[0]
                    code = unpack(buf, pos + 4)[0]
                    self._check_startup(length, code)
                    end = pos + length
                    if end > size:
                        self._need = length
                        break
                    raw = view[pos:end].tobytes()
                    out.append((0, raw[4:], raw))
                    pos = end
                    if code >> 16 != _SPECIAL_MAJOR:
                        # After the StartupMessage every message carries a type byte; after an
                        # SSL/GSSENC request refused with 'N' another startup packet follows.
                        self.startup = False
                    continue
                if size - pos < 5:
                    break
                msg_type = buf[pos]
                length = unpack(buf, pos + 1)[0]
                if (
                    msg_type not in FRONTEND_TYPES
                    or length < 4
                    or length - 3 > self.max_message_bytes
                ):
                    raise self._bad_header(msg_type, length)
                end = pos + 1 + length
                if end > size:
                    self._need = end - pos
                    break
                raw = view[pos:end].tobytes()
                out.append((msg_type, raw[5:], raw))
                pos = end
        if pos:
            # One compaction per feed; bytearray deletes from the front without moving much.
            # An unfinished message therefore always starts at the head of the buffer.
            del buf[:pos]
        return out

    def _feed_fresh(self, data: bytes) -> list[Frame]:
        """`feed` with nothing buffered (almost every feed): frames are cut from `data` itself.

        The same checks as `feed`; only what is left unfinished is copied into the buffer, and
        a feed holding exactly one message (a simple Query) is its own raw frame.
        """
        self._need = 0
        out: list[Frame] = []
        size = len(data)
        pos = 0
        unpack = _UNPACK_U32
        types = FRONTEND_TYPES
        while size - pos >= 5:
            msg_type = data[pos]
            length = unpack(data, pos + 1)[0]
            if msg_type not in types or length < 4 or length - 3 > self.max_message_bytes:
                raise self._bad_header(msg_type, length)
            end = pos + 1 + length
            if end > size:
                self._need = end - pos
                break
            raw = data if pos == 0 and end == size else data[pos:end]
            out.append((msg_type, raw[5:], raw))
            pos = end
        if pos < size:
            # The unfinished message starts the buffer, as `feed` expects of a later feed.
            with memoryview(data) as view:
                self._buf += view[pos:]
        return out

    def _bad_header(self, msg_type: int, length: int) -> ProtocolError:
        """What is wrong with a message header that `feed` refused (type first, then length)."""
        if msg_type not in FRONTEND_TYPES:
            return ProtocolError(f"invalid frontend message type {_type_repr(msg_type)}")
        if length < 4:
            return ProtocolError(f"invalid message length {length}")
        return ProtocolError(
            f"message of {length - 3} bytes exceeds the limit of {self.max_message_bytes}"
        )

    def _check_startup(self, length: int, code: int) -> None:
        _check_startup_length(length)
        if code == CANCEL_REQUEST_CODE:
            if length != _CANCEL_REQUEST_LENGTH:
                raise ProtocolError(f"invalid cancel request length {length}")
        elif code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            if length != 8:
                raise ProtocolError(f"invalid encryption request length {length}")
        elif code >> 16 == _SPECIAL_MAJOR:
            raise ProtocolError(f"unsupported startup request code {code}")
        elif code >> 16 != 3:
            raise ProtocolError(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0"
            )
        # A startup packet shorter than the protocol word plus a terminator cannot be valid.
        elif length < 9:
            raise ProtocolError("startup packet has no parameters terminator")


def _check_startup_length(length: int) -> None:
    if length < 8:
        raise ProtocolError(f"invalid startup packet length {length}")
    if length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolError(f"startup packet of {length} bytes is too long")


class BackendFramer:
    """Split the upstream-to-proxy byte stream into whole messages (authentication phase, tests).

    The relay's hot path uses BackendScanner instead; this one copies every message.
    """

    __slots__ = ("_buf", "_need", "max_message_bytes")

    def __init__(self, max_message_bytes: int = 1024 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._need = 0

    @property
    def pending_bytes(self) -> int:
        """Size of the buffered incomplete tail."""
        return len(self._buf)

    def take_pending(self) -> bytes:
        """Remove and return the incomplete tail (to hand the stream to another reader)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        return data

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        """Add bytes; return every complete message as (type byte, payload, raw frame)."""
        buf = self._buf
        buf += data
        size = len(buf)
        if size < self._need:
            return []
        self._need = 0
        out: list[tuple[int, bytes, bytes]] = []
        pos = 0
        unpack = _UNPACK_U32
        with memoryview(buf) as view:
            while size - pos >= 5:
                msg_type = buf[pos]
                if msg_type not in BACKEND_TYPES:
                    raise ProtocolError(f"invalid backend message type {_type_repr(msg_type)}")
                length = unpack(buf, pos + 1)[0]
                if length < 4:
                    raise ProtocolError(f"invalid message length {length}")
                if length + 1 > self.max_message_bytes:
                    raise ProtocolError(f"backend message of {length + 1} bytes is too large")
                end = pos + 1 + length
                if end > size:
                    self._need = end - pos
                    break
                raw = view[pos:end].tobytes()
                out.append((msg_type, raw[5:], raw))
                pos = end
        if pos:
            del buf[:pos]
        return out


class BackendScanner:
    """Watch the upstream-to-proxy stream: pass bytes through, report every non-row message
    and the first DataRow or CopyData of each run of them.

    DataRow and CopyData frames may be split across feeds and are forwarded as they arrive
    (constant memory for huge results); any other frame is held back until it is complete so the
    relay can replace it whole. A run is the DataRow (or CopyData) frames that follow one
    another with no other message between, across feeds: only its first is reported (payload
    None; its end may lie beyond this feed, for a split frame), the rest pass with one
    comparison each. Nothing but a reported message changes what the relay expects, so
    checking the first of a run checks them all, at no cost per row.
    """

    __slots__ = ("_hold", "_need", "_run", "_skip", "max_message_bytes")

    def __init__(self, max_message_bytes: int = 1024 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self._hold = bytearray()  # incomplete header or incomplete non-data frame
        self._need = 0  # size _hold must reach before the held frame is complete
        self._skip = 0  # body bytes of a split DataRow/CopyData still to pass through
        self._run = -1  # type of the run of DataRow/CopyData frames going on (-1: none)

    @property
    def pending_bytes(self) -> int:
        """Bytes held back, waiting for the rest of their frame."""
        return len(self._hold)

    @property
    def expected_bytes(self) -> int:
        """Size of the frame held back, as its header announced it (0 while none is, or its
        header is not complete yet)."""
        return self._need

    @property
    def at_boundary(self) -> bool:
        """True when the stream fed so far ends on a message boundary (nothing held or owed)."""
        return not self._hold and not self._skip

    @property
    def mid_frame(self) -> bool:
        """True when the bytes forwarded so far end inside a DataRow/CopyData frame (its rest
        has not arrived): anything else written to the client now would land inside it.
        (Held bytes were not forwarded: the forwarded stream ends on a boundary then.)"""
        return self._skip > 0

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int, bytes | None]]]:
        """Add upstream bytes; return (bytes to forward now, events for complete messages)."""
        events: list[tuple[int, int, int, bytes | None]] = []
        n = len(data)
        pos = 0
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                return data, events
            pos = skip
            self._skip = 0
        hold = self._hold
        if hold:
            if len(hold) + n < self._need:
                hold += data
                return b"", events
            # The held bytes precede `data`, so offsets are relative to their concatenation.
            hold += data
            buf = bytes(hold)
            hold.clear()
            n = len(buf)
        else:
            buf = data
        self._need = 0
        unpack = _UNPACK_TYPE_LENGTH
        payload_types = _PAYLOAD_TYPES
        backend_types = BACKEND_TYPES
        bodiless = _BODILESS
        limit = self.max_message_bytes
        run = self._run
        last = n - 5  # a header fits only while pos <= last
        while pos <= last:
            msg_type, length = unpack(buf, pos)
            end = pos + 1 + length
            # Fast path (almost every frame of a large result): a whole DataRow/CopyData of the
            # run going on.
            if msg_type == run and length >= 4 and end <= n:
                pos = end
                continue
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            if msg_type == 68 or msg_type == 100:  # noqa: PLR1714
                if msg_type != run:  # the first of a run: the relay checks it is due
                    run = msg_type
                    events.append((msg_type, pos, end, None))
                if end <= n:
                    pos = end
                    continue
                # A split row: forward what we have, pass the rest through on later feeds.
                self._skip = end - n
                self._run = run
                return buf, events
            run = -1  # any other message ends the run
            if msg_type not in backend_types:
                raise ProtocolError(f"invalid backend message type {_type_repr(msg_type)}")
            if length != 4 and msg_type in bodiless:
                raise ProtocolError(f"invalid length {length} of message {_type_repr(msg_type)}")
            if length + 1 > limit:
                raise ProtocolError(f"backend message of {length + 1} bytes is too large")
            if end > n:
                self._need = length + 1
                break
            events.append(
                (msg_type, pos, end, buf[pos + 5 : end] if msg_type in payload_types else None)
            )
            pos = end
        self._run = run
        if pos >= n:
            return buf, events
        # Hold back the incomplete tail: a partial header or a partial non-data frame.
        hold += buf[pos:]
        return buf[:pos], events


def _type_repr(msg_type: int) -> str:
    """Render a type byte for an error message without echoing control characters."""
    ch = chr(msg_type)
    return repr(ch) if ch.isprintable() and msg_type < 128 else f"0x{msg_type:02x}"
