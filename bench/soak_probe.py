"""Read-only snapshot of a running dbward's internal tables, run inside it by bench/soak.py.

soak.py attaches gdb to the dbward process while its event-loop thread waits in epoll (the GIL
released, no Python code running on it), takes the GIL and executes this file with
`PyRun_SimpleString`. It only reads: it writes one JSON object to the path in the environment
of the call (the global `_SOAK_OUT`, set by the injected one-liner) and changes nothing else.
"""

from __future__ import annotations


def _soak_snapshot(out_path: str) -> None:
    import asyncio
    import gc
    import json
    import threading

    snap: dict[str, object] = {}
    # Garbage not collected yet is no leak: count what survives a full collection.
    gc.collect()
    objects = gc.get_objects()
    snap["gc_objects"] = len(objects)
    services = [o for o in objects if type(o).__name__ == "ListenerServices"]
    sinks = [o for o in objects if type(o).__name__ == "ProcessAuditSink"]
    pools = [o for o in objects if type(o).__name__ == "ClassifierPool"]
    snap["pgsession_objects"] = sum(1 for o in objects if type(o).__name__ == "PgSession")
    snap["upstream_protocol_objects"] = sum(
        1 for o in objects if type(o).__name__ == "UpstreamProtocol"
    )
    snap["sslprotocol_objects"] = sum(1 for o in objects if type(o).__name__ == "SSLProtocol")
    del objects
    for i, s in enumerate(services):
        p = f"listener{i}."
        snap[p + "sessions"] = len(s.sessions)
        snap[p + "unauthenticated_hosts"] = len(s.unauthenticated)
        snap[p + "unauthenticated_total"] = sum(s.unauthenticated.values())
        snap[p + "partial_message_bytes"] = s.partial_message_bytes
        snap[p + "cancel_keys"] = len(s.cancels._sessions)
        snap[p + "cancel_buckets"] = len(s.cancels._buckets)
    for i, s in enumerate(services):
        c = s.classifier
        p = f"classifier{i}."
        snap[p + "cache_entries"] = len(c._cache)
        snap[p + "template_entries"] = len(c._templates)
        snap[p + "cached_bytes"] = sum(c._cached_bytes.values())
    for i, k in enumerate(sinks):
        p = f"audit{i}."
        snap[p + "records"] = len(k._records)
        snap[p + "held"] = len(k._held)
        snap[p + "waiters"] = len(k._waiters)
        snap[p + "unacked_batches"] = len(k._unacked)
        snap[p + "failed_batches"] = len(k._failed)
        snap[p + "unacked_records"] = k._unacked_records
        loop = k._loop
        if loop is not None:
            snap["asyncio_tasks"] = len(asyncio.all_tasks(loop))
    for i, pool in enumerate(pools):
        executor = pool._executor
        snap[f"offload{i}.workers"] = 0 if executor is None else len(executor._processes or {})
    _allocator_numbers(snap)
    snap["python_threads"] = threading.active_count()
    snap["thread_names"] = ",".join(sorted(t.name for t in threading.enumerate()))
    with open(out_path, "w") as f:
        json.dump(snap, f)


def _allocator_numbers(snap: dict[str, object]) -> None:
    """Where the memory is: pymalloc blocks, glibc's heap in use / free, tracemalloc if on."""
    import ctypes
    import os
    import sys
    import tracemalloc

    snap["pymalloc_blocks"] = sys.getallocatedblocks()

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return
    # arena: bytes the main + thread arenas took with sbrk/mmap; uordblks in use, fordblks free
    # inside them; hblkhd: large blocks mmapped one by one. In use flat and free growing is
    # fragmentation; in use growing is a leak below Python (or a Python one pymalloc hides).
    snap["malloc_arena_kb"] = info.arena // 1024
    snap["malloc_in_use_kb"] = info.uordblks // 1024
    snap["malloc_free_kb"] = info.fordblks // 1024
    snap["malloc_mmapped_kb"] = info.hblkhd // 1024
    snap["malloc_mmapped_blocks"] = info.hblks
    if tracemalloc.is_tracing():
        current, _peak = tracemalloc.get_traced_memory()
        snap["tracemalloc_kb"] = current // 1024
        dump_dir = os.environ.get("DBWARD_SOAK_TRACEMALLOC_DIR")
        if dump_dir:
            count = len(os.listdir(dump_dir))
            tracemalloc.take_snapshot().dump(os.path.join(dump_dir, f"{count:04d}.snap"))
