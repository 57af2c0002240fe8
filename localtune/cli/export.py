"""Shipping a run: `fuse` into a model folder, `export` to GGUF."""
from __future__ import annotations

import json

import click

from . import cli


@cli.command()
@click.argument("target")
@click.option("--out", required=True, type=click.Path(), help="The folder to write (must not exist).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Re-quantize the fused model (group size 64); default: a float model.")
@click.option("--dequantize", is_flag=True, help="Accepted for mlx_lm.fuse users: a quantized base is always "
              "dequantized before fusing (fusing into 4-bit weights would round the adapters away).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (paths and check numbers).")
def fuse(target, out, quantize, dequantize, as_json):
    """Fold a run's adapters (every stage, in order) into its base; checked against base + adapters."""
    from ..export import fuse as do_fuse

    result = do_fuse(target, out, quantize=int(quantize) if quantize else None,
                     report=(lambda _: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(f"fused model written to {out} (adapter effect kept: {result.effect_kept:.1%})")


@cli.command()
@click.argument("target")
@click.option("--gguf", "as_gguf", is_flag=True, help="Write the model (adapters fused) as a GGUF file.")
@click.option("--lora", "as_lora", is_flag=True,
              help="Write only the run's LoRA adapters, as a GGUF LoRA adapter for llama.cpp's --lora.")
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0", "q4_k_m"]), default="f16", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--base", type=click.Path(dir_okay=False),
              help="With --lora --verify: the base .gguf to apply it to (default: the run's base GGUF).")
@click.option("--verify", is_flag=True, help="Load the file in llama.cpp and compare it with the MLX model.")
@click.option("--ollama", is_flag=True, help="Also write a Modelfile beside the file (ChatML templates).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (path, tensors, check numbers).")
def export(target, as_gguf, as_lora, quant, out, base, verify, ollama, as_json):
    """Export a run (RUN or RUN/stage) or a model folder to GGUF for llama.cpp: the whole model
    with the adapters fused (--gguf), or the adapters alone (--lora)."""
    report = (lambda _: None) if as_json else click.echo
    if as_gguf == as_lora:
        raise click.UsageError("choose one of --gguf (the fused model) or --lora (the adapters alone)")
    if as_lora:
        from ..export.lora import export_lora

        if quant != "f16" or ollama:
            raise click.UsageError("--lora writes f16 adapters; --quant and --ollama apply to --gguf only")
        result = export_lora(target, out, base, verify, report=report)
    else:
        from ..export import export_gguf

        if base:
            raise click.UsageError("--base applies to --lora only")
        result = export_gguf(target, out, quant, verify, ollama, report=report)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
