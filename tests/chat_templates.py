"""Tiny tokenizer folders with a chosen chat template: the bundled models/small tokenizer, other template."""
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).parent / "templates"

# Crafted templates: GOOD is ChatML; each BAD one commits the fault its lint is named after.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + END }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GOOD = CHATML.replace("END", "'<|im_end|>\\n'")
BAD = {
    "header_in_loss": GOOD.split("{% if add_generation_prompt %}")[0],  # ignores add_generation_prompt
    "no_eos": CHATML.replace("END", "'\\n'"),
    "double_bos": "{{ bos_token }}{{ bos_token }}" + GOOD,
    "drops_system": GOOD.replace("for m in messages", "for m in messages if m.role != 'system'"),
    "drops_tools": GOOD,  # renders neither tools nor tool_calls
}
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
# A row with a system prompt, and one with tools, a tool call and a tool result.
ROWS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}], "tools": TOOLS}]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def model_folder(dest: Path, chat_template: str | None, **config) -> Path:
    """models/small with its chat template (and tokenizer_config keys) replaced; weights linked, not copied."""
    src = ROOT / "models" / "small"
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dest / f.name).symlink_to(f)
        else:
            shutil.copy(f, dest / f.name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(config, chat_template=chat_template)
    if chat_template is None:
        del cfg["chat_template"]
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def load(dest: Path, chat_template: str | None, **config):
    from localtune import models

    return models.load_tokenizer(model_folder(dest, chat_template, **config))


def write_recipe(tmp_path: Path, chat_template: str | None, rows: list, max_seq_len=64, **stage) -> Path:
    """An SFT recipe on a copy of models/small with `chat_template`, its data `rows` in train.jsonl."""
    folder = model_folder(tmp_path / "model", chat_template)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {"kind": "sft", **stage}
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in stage.items())
    (tmp_path / "recipe.toml").write_text(
        f'[model]\npath = "{folder}"\n[[stages]]\ndata = "train.jsonl"\nsteps = 1\nbatch_size = 2\n'
        f'max_seq_len = {max_seq_len}\neval_every = 0\n{extra}[stages.adapter]\nrank = 4\n[eval]\ngeneral = "none"\n')
    return tmp_path / "recipe.toml"
