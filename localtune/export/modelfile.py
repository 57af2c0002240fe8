"""The Ollama Modelfile written beside a GGUF export (`export --ollama`)."""
from __future__ import annotations

from ..errors import LocaltuneError

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")


def _chatml(messages: list[dict]) -> str:
    """What CHATML renders in Ollama (system messages included), in Python."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """A Modelfile for `ollama create`: FROM the GGUF, TEMPLATE, SYSTEM default, stop tokens.

    The chat template is translated when it is ChatML; the translation is checked by rendering
    both on sample conversations. Anything else raises: write TEMPLATE by hand.
    """
    def render(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos + "<|im_start|>"):  # llama.cpp adds BOS itself
            return text[len(bos):]
        return text

    system = None
    alone = render([{"role": "user", "content": "Hi"}])
    if alone.startswith("<|im_start|>system\n"):  # a default system prompt
        system = alone[len("<|im_start|>system\n"):alone.index("<|im_end|>")]
    samples = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]]
    for messages in samples:
        with_default = messages if messages[0]["role"] == "system" or system is None else \
            [{"role": "system", "content": system}] + messages
        if render(messages) != _chatml(with_default):
            raise LocaltuneError("--ollama: this chat template is not ChatML, and only ChatML is translated to "
                                 "Ollama's TEMPLATE\n  fix: export without --ollama and write the Modelfile's "
                                 "TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in ("<|im_end|>", "<|im_start|>"):
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


