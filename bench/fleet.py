"""How many cameras move when a fleet grows from N to N+1 replicas, and how even the shards are.

Rendezvous hashing (daemon/fleet.py) side by side with the naive baseline, ``digest % N``, on the
same camera ids. Counts, not timings: the same on every machine.

    .venv/bin/python bench/fleet.py                 # 40 and 100 cameras, N = 1..7
    .venv/bin/python bench/fleet.py --cameras 1000 --max-n 15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.fleet import assign, owner, weight  # noqa: E402


def modulo(camera_id: str, count: int) -> int:
    return weight(0, camera_id) % count


def moved(ids: list[str], fn, n: int) -> tuple[int, int]:
    """(cameras that change shard, of those how many go to an old shard rather than the new one)."""
    changes = [c for c in ids if fn(c, n) != fn(c, n + 1)]
    return len(changes), sum(fn(c, n + 1) != n for c in changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[40, 100])
    ap.add_argument("--max-n", type=int, default=7, help="largest N in N -> N+1")
    args = ap.parse_args()
    for total in args.cameras:
        ids = [f"cam-{i:03d}" for i in range(1, total + 1)]
        print(f"\n{total} cameras (ids cam-001..cam-{total:03d})")
        print(f"{'N -> N+1':>9} | {'ideal':>6} | {'rendezvous':>10} | {'to old shards':>13} | {'modulo':>6} | "
              f"{'cameras per shard at N+1 (rendezvous)':<40}")
        print("-" * 100)
        for n in range(1, args.max_n + 1):
            hrw, hrw_bad = moved(ids, owner, n)
            mod, _ = moved(ids, modulo, n)
            sizes = [len(v) for v in assign(ids, n + 1).values()]
            print(f"{n:>4} -> {n + 1:<2} | {total / (n + 1):6.1f} | {hrw:10d} | {hrw_bad:13d} | {mod:6d} | "
                  f"{' '.join(map(str, sizes)):<40}")


if __name__ == "__main__":
    main()
