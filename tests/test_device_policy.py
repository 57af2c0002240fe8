"""The device policy: every CPU-versus-Metal choice in one place, and the Metal policy forced onto the CPU.

CI has no Metal, so `LOCALTUNE_DEVICE_POLICY=metal` runs here what a Mac runs: bf16 compute, mlx's
quantized kernels on a 4-bit base, the compiled QLoRA step, mlx-lm's fused distillation loss and
rollouts sampled from the 4-bit weights, through the whole chain SFT -> DPO -> reward -> PPO -> distill
-> fuse, from the CLI.
"""
import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from test_cli import invoke

from localtune import device, models
from localtune.errors import LocaltuneError
from localtune.run import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_policy_is_the_devices(monkeypatch):
    monkeypatch.delenv(device.POLICY_VARIABLE, raising=False)
    expected = "metal" if mx.default_device() == mx.gpu else "cpu"
    assert device.policy() == device.POLICIES[expected] and not device.policy_forced()
    cpu, metal = device.POLICIES["cpu"], device.POLICIES["metal"]
    assert (cpu.compute_dtype, cpu.dtype_bytes, metal.compute_dtype, metal.dtype_bytes) == ("float32", 4, "bfloat16", 2)
    assert cpu.dequantize_qlora and not metal.dequantize_qlora


def test_the_variable_forces_a_policy_and_a_bad_value_says_the_fix(monkeypatch):
    monkeypatch.setenv(device.POLICY_VARIABLE, "Metal")
    assert device.policy().name == "metal" and device.compute_dtype() == mx.bfloat16 and device.policy_forced()
    assert device.describe()["policy"] == {**vars(device.POLICIES["metal"]), "forced": True}
    monkeypatch.setenv(device.POLICY_VARIABLE, "tpu")
    with pytest.raises(LocaltuneError, match="LOCALTUNE_DEVICE_POLICY='tpu' is not a device policy.*cpu, metal"):
        device.policy()


def write_chain(root: Path) -> Path:
    """SFT -> DPO -> reward (a branch) -> PPO on the bundled smaller model (1.2M) quantized to 4 bits,
    then the same model in float distils from it: one step each (bf16 on the CPU is slow)."""
    (root / "sft.jsonl").write_text("\n".join((ROOT / "data/date_prefs/sft.jsonl").read_text().splitlines()[:4]) + "\n")
    (root / "pairs.jsonl").write_text(
        "\n".join((ROOT / "data/date_prefs/train.jsonl").read_text().splitlines()[:4]) + "\n")
    common = {"steps": 1, "batch_size": 2, "max_seq_len": 48, "learning_rate": 1e-3, "save_every": 1,
              "eval_every": 0, "report_every": 1}
    stages = [{"name": "sft", "kind": "sft", "data": "sft.jsonl"},
              {"name": "dpo", "kind": "dpo", "data": "pairs.jsonl", "beta": 0.1},
              {"name": "reward", "kind": "reward", "data": "pairs.jsonl"},
              {"name": "ppo", "kind": "ppo", "data": "pairs.jsonl", "reward_model": "reward", "minibatch_size": 2,
               "ppo_epochs": 1, "max_new_tokens": 4, "heldout_prompts": 2},
              {"name": "distill", "kind": "distill", "teacher": "ppo", "student": str(ROOT / "models/smaller"),
               "data": "sft.jsonl", "mode": "logits", "loss": "forward_kl", "top_k": 16}]
    lines = ['name = "metal-on-cpu"', f'[model]\npath = "{ROOT / "models/smaller"}"',
             "[model.quantize]\nbits = 4\ngroup_size = 64"]
    for stage in stages:
        lines += ["[[stages]]"] + [f"{k} = {json.dumps(v)}" for k, v in {**common, **stage}.items()]
        lines.append("[stages.adapter]\nrank = 4\nalpha = 8")
    lines.append('[eval]\ngeneral = "none"')
    path = root / "chain.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def spy(monkeypatch, module, name: str, calls: list) -> None:
    """Record calls of module.name (by the first argument's function name, or just the name)."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(getattr(args[0], "__name__", name) if args and callable(args[0]) else name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_the_metal_policy_runs_the_whole_chain_on_the_cpu(tmp_path, monkeypatch):
    from mlx_lm import load
    from mlx_lm.tuner import losses

    monkeypatch.setenv(device.POLICY_VARIABLE, "metal")
    compiled, quantized, dequantizing, fused = [], [], [], []
    spy(monkeypatch, mx, "compile", compiled)
    spy(monkeypatch, mx, "quantized_matmul", quantized)  # nn.QuantizedLinear: mlx's quantized kernel
    spy(monkeypatch, models, "use_cpu_quantized_path", dequantizing)
    spy(monkeypatch, losses, "kl_div_loss", fused)

    result = invoke("run", write_chain(tmp_path), "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages_done"] == ["sft", "dpo", "reward", "ppo", "distill"]
    assert manifest["device"]["compute_dtype"] == "bfloat16"
    assert manifest["device"]["policy"] == {**vars(device.POLICIES["metal"]), "forced": True}
    losses_by_stage = {}
    for m in read_metrics(run / "metrics.jsonl"):
        if m["kind"] == "train":
            losses_by_stage.setdefault(m["stage"], []).append(m["loss"])
    assert set(losses_by_stage) == {"sft", "dpo", "reward", "ppo", "distill"}
    assert all(math.isfinite(x) for v in losses_by_stage.values() for x in v), losses_by_stage
    # the Metal branches: no dequantizing layers, mlx's quantized kernel, the QLoRA step compiled, fused loss
    assert dequantizing == [] and quantized
    assert compiled.count("micro") == compiled.count("apply") == 5  # every stage's forward/backward compiled
    assert fused

    fused_dir = tmp_path / "fused"
    result = invoke("fuse", run, "--out", fused_dir)
    assert result.exit_code == 0, result.output
    model, tokenizer = load(str(fused_dir))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    result = invoke("generate", fused_dir, "--prompt", "Date: 11.11.1950", "--max-tokens", "4")
    assert result.exit_code == 0 and result.output.strip(), result.output
