"""[model] chat_template: a recipe's own template replaces the model's, in training, in the run
directory (which keeps a copy), and in what fuse and GGUF export write."""
import json

import pytest
from test_cli import invoke, only_run, write_recipe

from localtune import recipe as recipe_mod
from localtune.train.prepare import prepare

# The bundled model's ChatML, plus a system line: a template the model folder does not have.
TEMPLATE = ("{{ bos_token }}{{ '<|im_start|>system\\nrecipe template<|im_end|>\\n' }}{% for m in messages %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "hi"}]


def with_template(tmp_path, small_model_path, text=TEMPLATE, name="chat.jinja", **stage):
    recipe = write_recipe(tmp_path, small_model_path, **stage)
    if text is not None:
        (tmp_path / name).write_text(text)
    recipe.write_text(recipe.read_text().replace("[model]\n", f'[model]\nchat_template = "{name}"\n', 1))
    return recipe


def test_training_uses_the_recipes_template(tmp_path, small_model_path):
    prepared = prepare(recipe_mod.load(with_template(tmp_path, small_model_path)))
    assert prepared.tokenizer.chat_template == TEMPLATE
    assert "recipe template" in prepared.tokenizer.apply_chat_template(CHAT, tokenize=False)
    first = prepared.train["sft"].examples[0]
    assert "recipe template" in prepared.tokenizer.decode(first.tokens.tolist())


def test_a_run_keeps_its_template_and_fuse_and_export_carry_it(tmp_path, small_model_path):
    import gguf

    from localtune.loading import load_for_inference

    recipe = with_template(tmp_path, small_model_path, steps=2, save_every=2)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    assert (run / "chat_template.jinja").read_text() == TEMPLATE
    assert json.loads((run / "manifest.json").read_text())["chat_template"]["path"] == "chat.jinja"
    (tmp_path / "chat.jinja").unlink()  # the run is self-contained
    _, tokenizer = load_for_inference(str(run))
    assert tokenizer.chat_template == TEMPLATE
    assert invoke("fuse", run, "--out", tmp_path / "out" / "fused").exit_code == 0
    config = json.loads((tmp_path / "out" / "fused" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and not (tmp_path / "out" / "fused" / "chat_template.jinja").exists()
    assert json.loads((small_model_path / "tokenizer_config.json").read_text())["chat_template"] != TEMPLATE
    for target, out in ((run, tmp_path / "run.gguf"), (tmp_path / "out" / "fused", tmp_path / "fused.gguf")):
        result = invoke("export", target, "--gguf", "--out", out)
        assert result.exit_code == 0, result.output
        assert gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents() == TEMPLATE


@pytest.mark.parametrize("text, message", [
    (None, ["chat_template = 'chat.jinja'", "no such file"]),
    ("{% for m in messages %}{{ m.content }}\n{% endfor", ["chat.jinja:2", "not a valid Jinja template"]),
], ids=["missing file", "bad jinja"])
def test_a_bad_template_stops_the_run_before_anything_loads(tmp_path, small_model_path, text, message):
    recipe = with_template(tmp_path, small_model_path, text=text)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code != 0 and all(m in result.output for m in message), result.output
    assert "fix:" in result.output and not (tmp_path / "runs").exists()
