#!/usr/bin/env python3
"""Where scenario 1's CPU goes, per request, by component: `python3 benches/profile.py [a b d]`.

Runs `cargo bench --bench outbox -- --only 1 --variants ... --windows` once, under
`perf record -k realtime -e cpu-clock` (a software clock: it works on VMs without hardware
counters). The bench prints the wall-clock edges of every measurement window and the CPU per
request it measured in it (this process + nats-server, from /proc). Each sample is matched with
its window and sorted into a component by thread and symbol; a component's cost per request in a
window is its share of the window's samples times the window's CPU per request. Printed: the
median over rounds per variant, and the median over rounds of the difference from the first
variant within the same round (the variants of a round run back to back, so the machine's
changing speed mostly cancels out there, as in the bench's own paired ratios).

Needs `perf` (Debian: linux-perf) and perf_event_paranoid <= 2. A flat profile: inlined and
generic code lands under the component of its symbol, or "other".
"""

import bisect
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# First match wins: (component, thread regex, symbol-or-dso regex).
RULES = [
    ("nats-server, kernel", r"^nats-server", r"kernel"),
    ("nats-server, user", r"^nats-server", r""),
    ("SQLite writer thread, kernel (WAL writes, fsync)", r"^sqlite-", r"kernel"),
    ("SQLite writer thread, user", r"^sqlite-", r""),
    ("tokio threads, kernel (sockets, wake-ups)", r"", r"kernel"),
    ("async-nats", r"", r"async_nats"),
    ("SQLite on tokio threads", r"", r"sqlite3|rusqlite"),
    ("load generator (reqwest, url)", r"", r"reqwest|hyper_util::client|url::|idna|outbox::load"),
    ("HTTP (hyper, axum, tower, http)", r"", r"hyper|axum|tower|httparse|http::|http_body"),
    ("tokio runtime", r"", r"tokio"),
    ("malloc / free", r"", r"malloc|free|realloc|_int_|unlink_chunk"),
    ("serde / JSON", r"", r"serde"),
    ("JWT (HMAC-SHA256)", r"", r"ring_core|jsonwebtoken"),
    ("other", r"", r""),
]


def bench_binary(root: Path) -> str:
    built = subprocess.run(
        ["cargo", "bench", "--bench", "outbox", "--no-run", "--locked"],
        cwd=root, capture_output=True, text=True, check=True,
    )
    found = re.search(r"Executable .*\((.+)\)", built.stderr)
    if not found:
        sys.exit("cannot find the bench executable in cargo's output:\n" + built.stderr)
    return str(root / found.group(1))


def profile(binary: str, variants: list[str], workdir: Path):
    data = workdir / "perf.data"
    run = subprocess.run(
        ["perf", "record", "-q", "-k", "realtime", "-e", "cpu-clock", "-F", "1999",
         "-o", str(data), "--", binary, "--bench", "--only", "1",
         "--variants", ",".join(variants), "--windows"],
        capture_output=True, text=True,
    )
    if run.returncode != 0:
        sys.exit(f"the bench failed:\n{run.stdout}\n{run.stderr}")
    # (start, end, variant, round, CPU us per request), in time order.
    windows = []
    rounds: Counter = Counter()
    for v, start, end, us in re.findall(
        r"window 1([abcd]) ([0-9.]+) ([0-9.]+) ([0-9.]+)", run.stdout
    ):
        windows.append((float(start), float(end), v, rounds[v], float(us)))
        rounds[v] += 1
    if not windows:
        sys.exit(f"the bench printed no measurement windows:\n{run.stdout}")
    windows.sort()
    starts = [w[0] for w in windows]
    samples = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,time,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    counts = {(w[2], w[3]): Counter() for w in windows}
    for line in samples.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        thread, at, rest = parts[0], float(parts[1].rstrip(":")), parts[2]
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or at > windows[i][1]:
            continue  # between windows: start-up, warm-up, draining
        # Build and helper processes are not the service, the load generator or NATS.
        if not re.match(r"tokio-rt-worker|sqlite-|nats-server|outbox-", thread):
            continue
        for name, thread_re, sym_re in RULES:
            if re.search(thread_re, thread) and re.search(sym_re, rest):
                counts[(windows[i][2], windows[i][3])][name] += 1
                break
    # Per window: component -> us per request.
    cost = {}
    for _, _, v, r, us in windows:
        c = counts[(v, r)]
        total = sum(c.values())
        if total:
            cost[(v, r)] = {k: n / total * us for k, n in c.items()}
    return cost, run.stdout


def main() -> None:
    variants = sys.argv[1:] or ["a", "b", "d"]
    if not all(re.fullmatch(r"[abcd]", v) for v in variants) or len(set(variants)) != len(variants):
        sys.exit("usage: benches/profile.py [a|b|c|d ...] (default: a b d; the first is the base)")
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    if paranoid.exists() and int(paranoid.read_text()) > 2:
        sys.exit(f"perf cannot sample here: {paranoid} is {paranoid.read_text().strip()} (needs <= 2)")
    root = Path(__file__).resolve().parent.parent
    binary = bench_binary(root)
    with tempfile.TemporaryDirectory() as tmp:
        cost, out = profile(binary, variants, Path(tmp))
    for line in dict.fromkeys(out.splitlines()):  # the bench prints some of these twice
        if line.startswith(("hardware:", "versions:", "load average:")):
            print(line)
    base = variants[0]
    rounds = sorted({r for (_, r) in cost})
    names = [n for n, _, _ in RULES] + ["total"]

    def value(v, r, n):
        c = cost.get((v, r))
        if c is None:
            return None
        return sum(c.values()) if n == "total" else c.get(n, 0.0)

    def median_of(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else float("nan")

    print(f"\nCPU per request by component, us: median of {len(rounds)} rounds; "
          f"'vs 1{base}' is the median of the differences within each round")
    others = variants[1:]
    print("| component | " + " | ".join(f"1{v}" for v in variants) + " | "
          + " | ".join(f"1{v} vs 1{base}" for v in others) + " |")
    print("|---|" + "---|" * (len(variants) + len(others)))
    for n in names:
        medians = [median_of(value(v, r, n) for r in rounds) for v in variants]
        deltas = []
        for v in others:
            pairs = [(value(v, r, n), value(base, r, n)) for r in rounds]
            deltas.append(median_of(x - y for x, y in pairs if x is not None and y is not None))
        print(f"| {n} | " + " | ".join(f"{x:.1f}" for x in medians) + " | "
              + " | ".join(f"{d:+.1f}" for d in deltas) + " |")


if __name__ == "__main__":
    main()
