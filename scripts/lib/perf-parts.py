#!/usr/bin/env python3
"""Splits the CPU samples of `perf script` output (perf record -e cpu-clock --call-graph dwarf)
into the parts of grid's work, and prints the milliseconds of each per unit.

Usage: perf-parts.py HZ UNITS FILE...   (HZ: the sampling frequency; UNITS: what to divide by,
e.g. the shards the recorded processes handled)

Each sample goes to the part of the frame nearest the leaf that names one (a sample inside the
kernel counts for the code that called into it); a sample no frame names is "other".
"""
import collections
import sys

# (part, prefixes of a frame's function path), checked in order for each frame.
PARTS = [
    ("signatures (ed25519)", ("ed25519_dalek", "curve25519_dalek")),
    ("claims and grants", (
        "grid_protocol::submitter::Submitter::handle_claim", "grid_protocol::submitter::Submitter::grant",
        "grid_protocol::worker::Worker::claim", "grid_protocol::worker::Worker::handle_grant",
        "grid_protocol::worker::Worker::schedule")),
    ("results", (
        "grid_protocol::submitter::Submitter::handle_result", "grid_protocol::worker::Worker::execution_finished",
        "grid_protocol::record", "grid_protocol::quorum")),
    ("protocol, the rest", ("grid_protocol",)),
    ("run directory", (
        "grid_node::exec::Executor::make_run_dir", "grid_node::exec::RunDir", "grid_node::exec::remove_tree",
        "grid_node::store::Store::materialize")),
    ("process start and end", (
        "grid_node::exec::process", "std::process", "std::sys::process", "tokio::process", "__libc_fork")),
    ("cgroups", ("grid_node::exec::cgroup",)),
    ("shard log and outputs", ("grid_node::exec",)),
    ("store and job records (RocksDB)", ("rocksdb", "grid_node::store", "grid_node::jobdb")),
    ("messages: encode, decode, engine", ("grid_node::engine", "grid_node::daemon", "grid_node::api", "grid_node::live")),
    ("network (libp2p, TLS, yamux)", (
        "libp2p", "yamux", "rustls", "futures_rustls", "aws_lc", "multistream_select", "grid_node::mesh")),
    ("async runtime (tokio, timers)", ("tokio", "futures_timer", "futures_util", "futures_channel")),
]


def depths(text: str):
    """Each character of `text` with its depth in angle brackets (a bracket counts outside)."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "<":
            yield i, ch, depth
            depth += 1
        elif ch == ">":
            depth -= 1
            yield i, ch, depth
        else:
            yield i, ch, depth


def function_path(sym: str) -> str:
    """`<A<T> as B>::f` -> `A::f`; generics removed."""
    sym = sym.split(" (")[0]
    if sym.startswith("<") and " as " in sym:
        # The end of the leading `<...>`, then the top-level ` as ` inside it.
        close = next((i for i, ch, d in depths(sym) if ch == ">" and d == 0), None)
        if close is not None:
            inner, rest = sym[1:close], sym[close + 1:]
            cut = next((i for i, _, d in depths(inner) if d == 0 and inner.startswith(" as ", i)), None)
            sym = (inner if cut is None else inner[:cut]) + rest
    return "".join(ch for _, ch, d in depths(sym) if d == 0 and ch not in "<>").lstrip("&")


def part_of(frames):
    for f in frames:
        path = function_path(f)
        for part, prefixes in PARTS:
            if path.startswith(prefixes):
                return part
    return "other"


def main():
    hz, units = float(sys.argv[1]), float(sys.argv[2])
    counts = collections.Counter()
    for name in sys.argv[3:]:
        with open(name, errors="replace") as f:
            text = f.read()
        for sample in text.split("\n\n"):
            lines = sample.strip().split("\n")
            if len(lines) < 2:
                continue
            frames = [l.strip().split(None, 1)[1] for l in lines[1:] if len(l.strip().split(None, 1)) == 2]
            counts[part_of(frames)] += 1
    total = sum(counts.values())
    ms = lambda n: 1000.0 * n / hz / units
    for part, _ in PARTS + [("other", ())]:
        if counts[part]:
            print(f"  {part:<36} {ms(counts[part]):7.2f} ms  ({100 * counts[part] / total:4.1f} %)")
    print(f"  {'in all':<36} {ms(total):7.2f} ms")


if __name__ == "__main__":
    main()
