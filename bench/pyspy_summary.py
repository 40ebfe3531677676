"""Where a py-spy profile's samples went, from its raw (collapsed-stack) output (bench/gpu_pyspy.sh writes two:
--idle, every thread's stacks, waits included; --gil, only the thread holding the GIL).

    python bench/pyspy_summary.py RAW[.gz] [--thread halkspeech-engine] [--top 20]

Prints each thread's share of the samples; with --thread, that thread's leading stack tails (the last three
frames, so a wait shows with what waited) and the frames that appear most in its stacks (inclusive).
"""

from __future__ import annotations

import argparse
import collections
import gzip
from pathlib import Path


def read(path: Path) -> list[tuple[list[str], int]]:
    """[(frames, samples)]: the thread first, then the stack from its root."""
    opener = gzip.open if path.suffix == ".gz" else open
    stacks = []
    with opener(path, "rt") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                stack, count = line.rsplit(" ", 1)
                stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    return frame.split(" (")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--thread", help="a thread name (its part of the stacks' first frame)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    stacks = read(args.raw)
    total = sum(n for _, n in stacks)
    threads = collections.Counter[str]()
    for frames, n in stacks:
        threads[frames[0]] += n
    print(f"{args.raw.name}: {total} samples")
    for name, n in threads.most_common(args.top):
        print(f"{n:8d} {100 * n / total:5.1f}%  {name}")
    if args.thread:
        mine = [(frames, n) for frames, n in stacks if args.thread in frames[0]]
        count = sum(n for _, n in mine)
        tails, inclusive = collections.Counter[str](), collections.Counter[str]()
        for frames, n in mine:
            tails[" ; ".join(short(f) for f in frames[-3:])] += n
            for frame in set(frames[1:]):
                inclusive[frame] += n
        print(f"\n{args.thread}: {count} samples; stack tails")
        for tail, n in tails.most_common(args.top):
            print(f"{n:8d} {100 * n / count:5.1f}%  {tail}")
        print("\nframes, inclusive")
        for frame, n in inclusive.most_common(args.top):
            print(f"{n:8d} {100 * n / count:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
