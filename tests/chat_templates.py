"""Tiny tokenizer folders with a chosen chat template: the bundled models/small tokenizer, other template."""
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).parent / "templates"


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
