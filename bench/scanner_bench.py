"""Micro-benchmark of BackendScanner: 1,000,000 small DataRows fed in 64 KiB chunks."""

from __future__ import annotations

import struct
import time

from dbward.wire.postgres.framing import BackendScanner

ROWS = 1_000_000
CHUNK = 64 * 1024


def build_stream(rows: int) -> bytes:
    """A result set as PostgreSQL sends it: T, many D, C, Z."""
    parts = [b"T" + struct.pack("!IH", 6, 0)]
    for i in range(rows):
        a = str(i).encode()
        b = b"name-%d" % (i % 1000)
        body = struct.pack("!Hi", 2, len(a)) + a + struct.pack("!i", len(b)) + b
        parts.append(b"D" + struct.pack("!I", len(body) + 4) + body)
    tag = b"SELECT %d\x00" % rows
    parts.append(b"C" + struct.pack("!I", len(tag) + 4) + tag)
    parts.append(b"Z\x00\x00\x00\x05I")
    return b"".join(parts)


def main() -> None:
    stream = build_stream(ROWS)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    best = float("inf")
    for _ in range(5):
        scanner = BackendScanner()
        forwarded = 0
        events = 0
        start = time.perf_counter()
        for chunk in chunks:
            out, ev = scanner.feed(chunk)
            forwarded += len(out)
            events += len(ev)
        elapsed = time.perf_counter() - start
        # T, the first D (the rest of the run is not reported), C, Z
        assert forwarded == len(stream) and events == 4 and scanner.at_boundary
        best = min(best, elapsed)
    frames = ROWS + 3
    print(f"{len(stream) / 1e6:.1f} MB, {frames} frames, {len(chunks)} chunks of {CHUNK} bytes")
    print(
        f"best of 5: {best * 1e3:.1f} ms  {len(stream) / best / 1e6:.0f} MB/s  "
        f"{best / frames * 1e9:.0f} ns/frame"
    )


if __name__ == "__main__":
    main()
