"""The contamination firewall's speed: 100k training rows against 5k golden rows.

    python tests/benchmarks/bench_contamination.py [--train 100000] [--golden 5000] [--words 60]

Synthetic rows of random words (a 20k-word vocabulary, Zipf-like frequencies) with planted exact
and near duplicates. Times `contamination.check` (normalisation, 13-gram hashing, lookup) and
checks that every planted duplicate is found. Writes tests/benchmarks/results/bench_contamination.md.
The issue's target: under a minute on 2 cores. The issue names no reference tool for this check,
so the baseline is a brute-force pairwise n-gram overlap on a 1% sample, same run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_contamination.md"


def rows(n: int, words: int, vocab: list[str], rng: random.Random, weights) -> list[tuple[str, dict]]:
    return [(f"row:{i}", {"text": " ".join(rng.choices(vocab, weights, k=words))}) for i in range(n)]


def brute_force(train, golden, n: int, near: float) -> int:
    """Every training row against every golden row, n-gram sets intersected pair by pair."""
    from localtune.integrity.contamination import ngrams, row_text, words

    g = [ngrams(words(row_text(r)), n) for _, r in golden]
    found = 0
    for _, row in train:
        t = ngrams(words(row_text(row)), n)
        found += any(len(t & x) / len(x) >= near for x in g if x)
    return found


def main() -> None:
    from localtune.integrity.contamination import check

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--golden", type=int, default=5_000)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, nothing written: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.train, args.golden, args.planted = 2_000, 200, 20
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    golden = rows(args.golden, args.words, vocab, rng, weights)
    train = rows(args.train, args.words, vocab, rng, weights)
    for k in range(args.planted):  # half exact copies, half with two words changed near the end
        g = golden[rng.randrange(len(golden))][1]["text"].split()
        if k % 2:
            g[-3], g[-8] = "changed", "words"
        train[rng.randrange(len(train))] = (f"planted:{k}", {"text": " ".join(g).upper()})
    t0 = time.perf_counter()
    report = check(train, golden)
    seconds = time.perf_counter() - t0
    found = {o.train for o in report.overlaps}
    missed = sum(1 for where, _ in train if where.startswith("planted:") and where not in found)
    sample = train[: len(train) // 100]
    t1 = time.perf_counter()
    brute_force(sample, golden, 13, 0.5)
    brute = (time.perf_counter() - t1) * len(train) / len(sample)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    text = "\n".join([
        "# Contamination firewall speed", "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end",
        f"- command: `python tests/benchmarks/bench_contamination.py --train {args.train} --golden {args.golden} "
        f"--words {args.words}`", "",
        "| training rows | golden rows | words per row | check (13-grams) | planted duplicates found | "
        "brute force, pairwise (extrapolated from 1%) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.train:,} | {args.golden:,} | {args.words} | {seconds:.1f} s | "
        f"{args.planted - missed}/{args.planted} | {brute:.0f} s | {brute / seconds:.0f}x |", ""])
    print(text)
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
