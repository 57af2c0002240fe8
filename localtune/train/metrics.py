"""Metrics as the TUI and `status` show them: the fields every stage logs, and each method's own
(its `Method.metrics`, named once in its file: its loss returns them, the trainer averages them
over each report window into the "train" record of metrics.jsonl).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the field in a metrics.jsonl record
    label: str
    fmt: str = "{:.4f}"

    def show(self, value) -> str:
        try:
            return self.fmt.format(value)
        except (TypeError, ValueError):
            return str(value)


# Fields of every "train" record (the trainer's report window plus the loop's own).
COMMON = (
    Metric("loss", "loss"),
    Metric("lr", "learning rate", "{:.2e}"),
    Metric("real_tokens_per_sec", "tokens/s", "{:,.0f}"),
    Metric("grad_norm", "grad norm", "{:.3f}"),
    Metric("peak_memory_gb", "peak memory", "{:.2f} GB"),
)
_BOOKKEEPING = {"t", "stage", "step", "kind", "steps_total", "eta_sec", "tokens_per_sec", "pairs_per_sec", "time_sec"}

def method_metrics(kind: str, record: dict) -> list[tuple[Metric, object]]:
    """The metrics a stage lives by, with their latest values.

    A method without named metrics (one not built yet) gets every numeric field of its
    records that is not common to all methods.
    """
    from .. import methods

    named = methods.get(kind).metrics if kind in methods.REGISTRY else None
    if named:
        return [(m, record[m.key]) for m in named if m.key in record]
    common = {m.key for m in COMMON} | _BOOKKEEPING
    return [(Metric(k, k.replace("_", " ")), v) for k, v in record.items()
            if k not in common and isinstance(v, (int, float)) and not isinstance(v, bool)]
