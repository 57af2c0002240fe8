"""JSONL readers, chat templating with loss masks, and resumable batching.

Formats (one object per line): {"messages": [...]}, {"prompt", "completion"}, {"text"}.
A bad row is reported as `file:line: what is wrong`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import render
from .render import ROLES  # noqa: F401  (the roles a chat row may use)


def _format_of(row: dict) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompt"  # prompts only: the teacher answers them (distill, mode = "sequence")
    return None


def _check_row(row, where: str, fmt: str) -> None:
    if fmt == "messages":
        render.check_messages(row["messages"], where)
        if row.get("tools") is not None:
            render.check_tools(row["tools"], where)
    elif fmt == "preference":
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f'{where}: preference row is missing "{key}"; expected '
                                '{"prompt", "chosen", "rejected"}')
        if not isinstance(row["prompt"], (str, list)) or not row["prompt"]:
            raise DataError(f'{where}: "prompt" must be a string or a list of messages')
        if "margin" in row and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))):
            raise DataError(f'{where}: "margin" must be a number, got {json.dumps(row["margin"])}')
        for key in ("chosen", "rejected"):
            value = row[key]
            if isinstance(value, list):
                render.check_messages(value, f'{where}: "{key}"')
            elif not isinstance(value, str) or not value:
                raise DataError(f'{where}: "{key}" must be a non-empty string or a list of messages, '
                                f"got {type(value).__name__}")
    elif fmt == "prompt":
        if not isinstance(row["prompt"], (str, list)) or not row["prompt"]:
            raise DataError(f'{where}: "prompt" must be a non-empty string or a list of messages')
    elif fmt == "completion":
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                raise DataError(f'{where}: "{key}" must be a string, got {type(row[key]).__name__}')
    elif not isinstance(row["text"], str) or not row["text"]:
        raise DataError(f'{where}: "text" must be a non-empty string')


def read_jsonl(path: str | Path) -> tuple[list[dict], str]:
    """Rows of a JSONL file and their common format; errors name file:line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file\n  fix: check the stage's data = ... path "
                        "(relative paths are resolved from the recipe's folder)")
    rows, fmt = [], None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)\n"
                                "  fix: save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row_fmt = _format_of(row)
            if row_fmt is None:
                raise DataError(f'{where}: expected "messages", "prompt" + "completion", "text", or '
                                f'"prompt" + "chosen" + "rejected"; got keys {sorted(row)}')
            if fmt is None:
                fmt = row_fmt
            elif row_fmt != fmt:
                raise DataError(f"{where}: this row is {row_fmt!r} but earlier rows are {fmt!r}; "
                                "one file holds one format")
            _check_row(row, where, fmt)
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the dataset is empty\n  fix: add at least one JSON object per line")
    return rows, fmt


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (T,) bool: position t is a target to learn
    skipped_turns: int = 0  # earlier assistant turns left untrained (a template that is not prefix-stable)
    row: int = -1  # index of the row it came from (encode sets it; lints name the row)
    truncated: bool = False  # cut to max_seq_len


class Encoder:
    """Turns rows into tokens + loss mask with the tokenizer's chat template.

    thinking: "keep" trains <think> blocks (and asks templates for enable_thinking=True); "strip" removes
    them from assistant turns first (and asks for enable_thinking=False).
    """

    def __init__(self, tokenizer, mask_prompt: bool = True, thinking: str = "keep"):
        self.tokenizer, self.mask_prompt, self.thinking = tokenizer, mask_prompt, thinking
        template = getattr(tokenizer, "chat_template", None)
        self.has_template = template is not None
        # Only templates that read enable_thinking get it (mlx-lm's wrapper also passes its own default).
        self.template_kwargs = {"enable_thinking": thinking == "keep"} \
            if isinstance(template, str) and "enable_thinking" in template else {}

    def template(self, messages, add_generation_prompt=False, tools=None) -> list[int]:
        kwargs = dict(self.template_kwargs, **({"tools": tools} if tools else {}))
        out = self.tokenizer.apply_chat_template(render.clean(messages, self.thinking),
                                                 add_generation_prompt=add_generation_prompt, tokenize=True,
                                                 **kwargs)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def messages(self, msgs: list[dict], tools=None) -> Example:
        tokens = self.template(msgs, tools=tools)
        mask = np.zeros(len(tokens), bool)
        if not self.mask_prompt:
            mask[1:] = True
            return Example(np.array(tokens, np.int32), mask)
        # Learn every assistant turn (tool calls included): its span lies between the prompt-so-far and the
        # turn's end; tool results and user turns stay masked. Templates that rewrite earlier turns (e.g.
        # dropping old reasoning) are not prefix-stable: for those only the last turn is learned, as mlx-lm does.
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        skipped = 0
        for k, i in enumerate(reversed(turns)):
            if i == 0:  # an opening assistant turn has no prompt to render (templates refuse empty chats)
                skipped = len(turns) - k
                break
            prefix = self.template(msgs[:i], add_generation_prompt=True, tools=tools)
            upto = tokens if i == turns[-1] and i == len(msgs) - 1 else self.template(msgs[: i + 1], tools=tools)
            if tokens[: len(prefix)] != prefix or tokens[: len(upto)] != upto:
                skipped = len(turns) - k
                break
            mask[len(prefix):len(upto)] = True
        return Example(np.array(tokens, np.int32), mask, skipped_turns=skipped)

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def completion(self, prompt: str, completion: str) -> Example:
        if self.has_template:
            return self.messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        tok = self.tokenizer
        head = self._bos() + tok.encode(prompt, add_special_tokens=False)
        tail = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
        mask = np.zeros(len(head) + len(tail), bool)
        mask[len(head) if self.mask_prompt else 1:] = True
        return Example(np.array(head + tail, np.int32), mask)

    def text(self, text: str) -> Example:
        tok = self.tokenizer
        tokens = self._bos() + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        mask = np.ones(len(tokens), bool)
        mask[0] = False
        return Example(np.array(tokens, np.int32), mask)

    def prompt_tokens(self, prompt, tools=None) -> list[int]:
        """What generation is conditioned on for a prompt string or a chat (used by task evaluation).

        A chat that ends with an assistant turn (a golden row) is cut before it: the model writes that turn.
        """
        if not isinstance(prompt, str):
            msgs = list(prompt)
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            return self.template(msgs, add_generation_prompt=True, tools=tools)
        if self.has_template:
            return self.template([{"role": "user", "content": prompt}], add_generation_prompt=True, tools=tools)
        tok = self.tokenizer
        return self._bos() + tok.encode(prompt, add_special_tokens=False)


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int = 0  # rows cut to max_seq_len
    dropped: int = 0  # rows left with no target tokens after truncation
    source: str = ""
    dropped_rows: list = field(default_factory=list)  # their row indices
    where: list | None = None  # per-row locations ("file:line"), when the reader knows them

    def __len__(self):
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)

    def where_of(self, row: int) -> str:
        return self.where[row] if self.where and 0 <= row < len(self.where) else f"{self.source}: row {row + 1}"


def encode_row(enc: Encoder, row: dict, fmt: str, max_seq_len: int, index: int = -1, where: str = "") -> Example:
    """One row as an example, cut to max_seq_len; a template that cannot render the row names it."""
    from jinja2 import TemplateError

    try:
        if fmt == "messages":
            ex = enc.messages(row["messages"], row.get("tools"))
        elif fmt == "completion":
            ex = enc.completion(row["prompt"], row["completion"])
        else:
            ex = enc.text(row["text"])
    except (TemplateError, TypeError) as e:
        raise DataError(f"{where or f'row {index + 1}'}: the chat template cannot render this row: {e}\n"
                        "  fix: reshape the row the way this model's template expects (roles, tool calls), "
                        "or use a model whose template supports it") from None
    ex.row = index
    if len(ex.tokens) > max_seq_len:
        ex = Example(ex.tokens[:max_seq_len], ex.loss_mask[:max_seq_len], ex.skipped_turns, index, True)
    return ex


def encode(rows: list[dict], fmt: str, tokenizer, max_seq_len: int, mask_prompt=True, source="",
           thinking="keep", where: list | None = None) -> Dataset:
    if fmt == "messages" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{source}: chat data (\"messages\") needs a chat template, and this model's tokenizer "
                        "has none.\n  fix: use a model with a chat template, add \"chat_template\" to its "
                        "tokenizer_config.json, or write the data as {\"prompt\", \"completion\"} or {\"text\"}")
    enc = Encoder(tokenizer, mask_prompt, thinking)
    ds = Dataset([], source=source, where=where)
    for i, row in enumerate(rows):
        ex = encode_row(enc, row, fmt, max_seq_len, i, ds.where_of(i))
        ds.truncated += ex.truncated
        if not ex.loss_mask[1:].any():
            ds.dropped_rows.append(i)
            continue
        ds.examples.append(ex)
    ds.dropped = len(ds.dropped_rows)
    if not ds.examples:
        why = f"lost its target tokens at max_seq_len={max_seq_len}" if ds.truncated else "has no token to train"
        raise DataError(f"{source}: every row {why} ({len(rows)} rows)\n"
                        "  fix: " + ("raise max_seq_len or shorten the prompts" if ds.truncated else
                                     "check the rows have assistant turns or completions, and run "
                                     "`localtune data preview` to see what the template renders"))
    return ds


def split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/valid split by fraction."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_valid = max(1, int(round(len(rows) * fraction)))
    if n_valid >= len(rows):
        raise DataError(f"valid_fraction={fraction} leaves no training rows out of {len(rows)}")
    valid = {int(i) for i in order[:n_valid]}
    return [r for i, r in enumerate(rows) if i not in valid], [rows[i] for i in sorted(valid)]


# Batching ------------------------------------------------------------------


@dataclass
class Batch:
    """inputs/targets (B, T) int32 · loss_mask (B, T) float32 · real (B, T) bool: not padding ·
    segments (B, T) int32: packed example index per token, -1 on padding (None unless packing) ·
    extras: a method's own per-batch arrays · pairs: preference pairs in the batch (0: not pairs) ·
    units: what the loss averages over when it is neither tokens nor pairs (GRPO: completions)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    real: np.ndarray
    segments: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    pairs: int = 0
    units: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def weight(self) -> int:
        """What the loss averages over: a method's units, pairs for preference batches, else target tokens."""
        return self.units or self.pairs or self.n_tokens

    @property
    def n_real_tokens(self) -> int:
        """Non-padding input tokens (what the model does useful work on)."""
        return int(self.real.sum())

    def target_positions(self, bucket: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
        """Flat (B*T) indices of scored positions and their weights, padded to a multiple of `bucket`.

        None when most positions are scored anyway (plain text): then gathering only costs time.
        """
        flat = self.loss_mask.reshape(-1)
        index = np.flatnonzero(flat).astype(np.int32)
        if len(index) > flat.size // 2:
            return None
        k = max(bucket, -(-len(index) // bucket) * bucket)
        padded = np.zeros(k, np.int32)
        padded[: len(index)] = index
        weight = np.zeros(k, np.float32)
        weight[: len(index)] = flat[index]
        return padded, weight


def collate_examples(examples: list[Example], pad_to_multiple: int = 8) -> Batch:
    width = max(len(e.tokens) for e in examples) - 1
    width = -(-width // pad_to_multiple) * pad_to_multiple
    B = len(examples)
    inputs = np.zeros((B, width), np.int32)
    targets = np.zeros((B, width), np.int32)
    mask = np.zeros((B, width), np.float32)
    real = np.zeros((B, width), bool)
    for b, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[b, :n], targets[b, :n] = e.tokens[:-1], e.tokens[1:]
        mask[b, :n] = e.loss_mask[1:]
        real[b, :n] = True
    return Batch(inputs, targets, mask, real)


def _pack(examples: list[Example], width: int) -> list[list[Example]]:
    """First-fit-decreasing bins of examples whose token counts sum to at most `width`."""
    bins, room = [], []
    for e in sorted(examples, key=lambda e: -len(e.tokens)):
        n = len(e.tokens)
        for i, r in enumerate(room):
            if n <= r:
                bins[i].append(e)
                room[i] -= n
                break
        else:
            bins.append([e])
            room.append(width - n)
    return bins


def _collate_packed(bins: list[list[Example]], width: int) -> Batch:
    B = len(bins)
    inputs = np.zeros((B, width), np.int32)
    targets = np.zeros((B, width), np.int32)
    mask = np.zeros((B, width), np.float32)
    segments = np.full((B, width), -1, np.int32)
    for b, group in enumerate(bins):
        pos = 0
        for s, e in enumerate(group):
            n = len(e.tokens) - 1
            inputs[b, pos:pos + n], targets[b, pos:pos + n] = e.tokens[:-1], e.tokens[1:]
            mask[b, pos:pos + n] = e.loss_mask[1:]
            segments[b, pos:pos + n] = s
            pos += n
    return Batch(inputs, targets, mask, segments >= 0, segments)


class Batches:
    """A resumable stream of training batches.

    The order is a pure function of (seed, epoch), so the cursor (epoch, index)
    is all a checkpoint needs to continue exactly where it stopped. With
    `shard=(rank, world)` the global batch is world x batch_size rows and this
    rank serves rows rank, rank + world, ... of each (data-parallel training).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, group_by_length=True,
                 packing=False, max_seq_len=512, collate=None, shard=(0, 1)):
        world = shard[1]
        need = batch_size * world
        per = f"batch_size={batch_size}" + (f" x {world} processes" if world > 1 else "")
        if packing:
            n_rows = len(_pack(dataset.examples, max_seq_len))
            if n_rows < need:
                raise DataError(f"{dataset.source}: packing gives {n_rows} rows of {max_seq_len} tokens, "
                                f"fewer than {per}\n  fix: lower batch_size")
        elif len(dataset) < need:
            raise DataError(f"{dataset.source}: {len(dataset)} examples is fewer than {per}\n"
                            f"  fix: lower batch_size to at most {len(dataset) // world} or add data")
        self.shard = shard
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.group_by_length, self.packing, self.max_seq_len = group_by_length, packing, max_seq_len
        self.epoch, self.index = 0, 0
        self._plan_epoch = None
        self.collate = collate or collate_examples

    def plan(self, epoch: int) -> list[list[int]] | list[list[Example]]:
        rank, world = self.shard
        return [list(b[rank::world]) for b in self._global_plan(epoch, self.batch_size * world)]

    def _global_plan(self, epoch: int, bs: int) -> list[list[int]] | list[list[Example]]:
        rng = np.random.default_rng([self.seed, epoch])
        ex = self.dataset.examples
        if self.packing:
            order = rng.permutation(len(ex))
            bins = _pack([ex[i] for i in order], self.max_seq_len)
            bins = [bins[i] for i in rng.permutation(len(bins))]
            return [bins[i:i + bs] for i in range(0, len(bins) - bs + 1, bs)]
        if self.group_by_length:
            # Sort by length with random tie-breaks, cut into batches, shuffle the batches.
            order = sorted(rng.permutation(len(ex)), key=lambda i: len(ex[i].tokens))
            batches = [order[i:i + bs] for i in range(0, len(order) - bs + 1, bs)]
            return [batches[i] for i in rng.permutation(len(batches))]
        order = rng.permutation(len(ex))
        return [list(order[i:i + bs]) for i in range(0, len(order) - bs + 1, bs)]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._current())

    def _current(self):
        if self._plan_epoch is None or self._plan_epoch[0] != self.epoch:
            self._plan_epoch = (self.epoch, self.plan(self.epoch))
        return self._plan_epoch[1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def served(self) -> int:
        """Batches handed out so far (every epoch has the same number)."""
        return self.epoch * self.batches_per_epoch + self.index

    def upcoming(self):
        """Example indices of the batches to come, without moving the cursor (not for packing)."""
        epoch, index = self.epoch, self.index
        plan = self._current()
        while True:
            if index >= len(plan):
                epoch, index = epoch + 1, 0
                plan = self.plan(epoch)
            yield [int(i) for i in plan[index]]
            index += 1

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        plan = self._current()
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
            plan = self._current()
        item = plan[self.index]
        self.index += 1
        if self.packing:
            return _collate_packed(item, self.max_seq_len)
        return self.collate([self.dataset.examples[i] for i in item])


def eval_batches(dataset: Dataset, batch_size: int, limit: int, collate=None):
    """Fixed, length-sorted validation batches (the same every evaluation)."""
    collate = collate or collate_examples
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i].tokens))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    step = max(1, len(chunks) // limit)
    return [collate([dataset.examples[i] for i in c]) for c in chunks[::step][:limit]]
