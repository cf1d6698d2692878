"""Prototype for a multi-process data path (README, "Using every core"): what it costs to
send per-chunk work events from forwarder processes to one attribution owner process.

Each forwarder packs one 16-byte event per streamed chunk (request slot, tokens, time)
with struct and writes them to a Unix stream socket in batches (a batch is flushed when
it holds `--batch` events; a real forwarder would also flush on a short timer). The
owner reads, unpacks with struct.iter_unpack and applies each event to a per-request
tally, which is what the attribution engine's tick does. Both sides run flat out, so the
owner's rate is the ceiling, and CPU seconds / events is the cost per chunk.

    .venv/bin/python bench/ipc_fanin.py                   # batches 1, 16, 256; 1 and 2 forwarders
    .venv/bin/python bench/ipc_fanin.py --seconds 3 --forwarders 1 2 4 --batch 64
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import sys
import time

EVENT = struct.Struct("<IHxxd")  # request slot, tokens in this chunk, monotonic time: 16 bytes
SLOTS = 4096


def forwarder(path: str, batch: int, seconds: float, slot_base: int, result: "multiprocessing.Queue[tuple[int, float]]") -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    pack_into = EVENT.pack_into
    size = EVENT.size
    buffer = bytearray(size * batch)
    sent = 0
    clock = time.monotonic
    started = clock()
    cpu0 = time.process_time()
    deadline = started + seconds
    slot = 0
    while True:
        now = clock()
        if now >= deadline:
            break
        for i in range(batch):
            pack_into(buffer, i * size, slot_base + slot, 1, now)
            slot = (slot + 1) % SLOTS
        sock.sendall(buffer)
        sent += batch
    cpu = time.process_time() - cpu0
    sock.close()
    result.put((sent, cpu))


def owner(server: socket.socket, forwarders: int, result: "multiprocessing.Queue[tuple[int, float, float]]") -> None:
    connections = [server.accept()[0] for _ in range(forwarders)]
    tokens = [0] * (SLOTS * forwarders)
    last = [0.0] * (SLOTS * forwarders)
    size = EVENT.size
    received = 0
    cpu0 = time.process_time()
    started = time.monotonic()
    leftovers = {c.fileno(): b"" for c in connections}
    import selectors

    selector = selectors.DefaultSelector()
    for c in connections:
        selector.register(c, selectors.EVENT_READ)
    open_ = len(connections)
    iter_unpack = EVENT.iter_unpack
    while open_:
        for key, _ in selector.select():
            c = key.fileobj
            data = c.recv(1 << 20)  # type: ignore[union-attr]
            if not data:
                selector.unregister(c)
                open_ -= 1
                continue
            data = leftovers[key.fd] + data
            whole = len(data) - len(data) % size
            leftovers[key.fd] = data[whole:]
            for slot_id, count, at in iter_unpack(memoryview(data)[:whole]):
                tokens[slot_id] += count  # the attribution tick: per-request work and time
                last[slot_id] = at
            received += whole // size
    elapsed = time.monotonic() - started
    result.put((received, time.process_time() - cpu0, elapsed))


def run(forwarders: int, batch: int, seconds: float) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    path = f"/tmp/ipc-fanin-{os.getpid()}.sock"
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(forwarders)
    owner_result: multiprocessing.Queue = ctx.Queue()
    fwd_result: multiprocessing.Queue = ctx.Queue()
    own = ctx.Process(target=owner, args=(server, forwarders, owner_result))
    own.start()
    procs = [ctx.Process(target=forwarder, args=(path, batch, seconds, i * SLOTS, fwd_result)) for i in range(forwarders)]
    for p in procs:
        p.start()
    sent = [fwd_result.get(timeout=seconds + 60) for _ in procs]
    received, owner_cpu, elapsed = owner_result.get(timeout=60)
    for p in procs + [own]:
        p.join(10)
    server.close()
    os.unlink(path)
    total_sent = sum(s for s, _ in sent)
    assert total_sent == received, (total_sent, received)
    return {
        "events_per_second": received / elapsed,
        "owner_us_per_event": owner_cpu / received * 1e6,
        "owner_cpu_percent": owner_cpu / elapsed * 100,
        "forwarder_us_per_event": sum(c for _, c in sent) / total_sent * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--forwarders", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    print(f"## Per-chunk IPC: forwarders -> one owner over a Unix socket ({os.cpu_count()} CPUs, {EVENT.size}-byte events)\n")
    print("| forwarders | batch (events) | events/s at the owner | owner CPU per event (µs) | owner CPU (% of a core) | forwarder CPU per event (µs) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for forwarders in args.forwarders:
        for batch in args.batch:
            runs = [run(forwarders, batch, args.seconds) for _ in range(args.reps)]

            def cell(key: str, fmt: str) -> str:
                values = sorted(r[key] for r in runs)
                mid = values[len(values) // 2]
                return fmt.format(mid) + (f" ({fmt.format(values[0])}..{fmt.format(values[-1])})" if len(values) > 1 else "")

            print(f"| {forwarders} | {batch} | {cell('events_per_second', '{:,.0f}')} | {cell('owner_us_per_event', '{:.2f}')} "
                  f"| {cell('owner_cpu_percent', '{:.0f}')} | {cell('forwarder_us_per_event', '{:.2f}')} |")  # fmt: skip
    print("\nValues: median of repetitions (min..max). Both sides run flat out; a real forwarder sends as chunks arrive.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
