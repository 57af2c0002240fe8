"""Each method's metrics, named once: the methods log these keys, the TUI shows them.

A method's loss function returns them in its metrics dict; the trainer averages them
over each report window into the "train" record of metrics.jsonl.
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


# Fields of every "train" record (trainer._Window.record plus the loop's own).
COMMON = (
    Metric("loss", "loss"),
    Metric("lr", "learning rate", "{:.2e}"),
    Metric("real_tokens_per_sec", "tokens/s", "{:,.0f}"),
    Metric("grad_norm", "grad norm", "{:.3f}"),
    Metric("peak_memory_gb", "peak memory", "{:.2f} GB"),
)
_BOOKKEEPING = {"t", "stage", "step", "kind", "steps_total", "eta_sec", "tokens_per_sec", "pairs_per_sec", "time_sec"}

METHOD_METRICS = {
    "sft": (),
    "dpo": (Metric("pairs_per_sec", "pairs/s", "{:,.1f}"),
            Metric("reward_margin", "reward margin", "{:+.3f}"),
            Metric("preference_accuracy", "pref. accuracy", "{:.1%}"),
            Metric("rewards_chosen", "reward chosen", "{:+.3f}"),
            Metric("rewards_rejected", "reward rejected", "{:+.3f}"),
            Metric("logps_chosen", "logp chosen", "{:.2f}"),
            Metric("logps_rejected", "logp rejected", "{:.2f}")),
    "reward": (Metric("accuracy", "pair accuracy", "{:.1%}"), Metric("margin", "reward margin", "{:+.3f}")),
    "ppo": (Metric("reward_mean", "reward", "{:+.3f}"), Metric("reward_std", "reward std", "{:.3f}"),
            Metric("kl", "KL to reference", "{:.3f}"), Metric("kl_coef", "KL coefficient", "{:.4f}"),
            Metric("entropy", "entropy", "{:.3f}"), Metric("clip_frac", "clip fraction", "{:.1%}"),
            Metric("approx_kl", "approx KL", "{:.4f}"), Metric("value_loss", "value loss"),
            Metric("explained_variance", "explained var.", "{:.2f}"),
            Metric("response_length", "response length", "{:.1f}"), Metric("rollout_sec", "rollout s", "{:.1f}"),
            Metric("scoring_sec", "scoring s", "{:.1f}")),
    "distill": (Metric("kl", "KL to teacher"), Metric("jsd", "JSD to teacher"),
                Metric("task_ratio", "student/teacher task", "{:.1%}")),
}


def method_metrics(kind: str, record: dict) -> list[tuple[Metric, object]]:
    """The metrics a stage lives by, with their latest values.

    A method without named metrics (one not built yet) gets every numeric field of its
    records that is not common to all methods.
    """
    named = METHOD_METRICS.get(kind)
    if named:
        return [(m, record[m.key]) for m in named if m.key in record]
    common = {m.key for m in COMMON} | _BOOKKEEPING
    return [(Metric(k, k.replace("_", " ")), v) for k, v in record.items()
            if k not in common and isinstance(v, (int, float)) and not isinstance(v, bool)]
