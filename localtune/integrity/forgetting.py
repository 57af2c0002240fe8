"""The forgetting guard: general ability measured during training, against a budget.

Every `every` steps the guard measures general NLL (evaluate.general_nll) and compares it with
the base's: increase = (NLL - NLL_base) / NLL_base. Over the budget it acts:

- warn: log it and go on;
- stop: stop the stage, and keep the last checkpoint that was within the budget;
- best: finish, then keep the within-budget checkpoint with the best task metric.

The kept weights are this stage's trainable arrays as they were at that step (held by reference:
the optimizer replaces arrays, it never writes into them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mlx.utils import tree_flatten


@dataclass
class Guard:
    measure: object  # model -> general NLL
    base_nll: float
    budget: float | None  # relative increase allowed; None: measure only
    every: int
    action: str = "warn"  # warn | stop | best
    task: object = None  # model -> task result (evaluate.task's; "value" higher is better), for action "best"
    start_task: dict | None = None  # the task result of the starting weights, when already measured
    history: list = field(default_factory=list)
    kept: dict | None = None  # {"step", "weights", "general_nll", "task", "task_result"}
    over_since: int | None = None

    def start(self, model, step: int) -> None:
        """The stage's starting weights are within budget by definition: the fallback to keep."""
        if self.action in ("stop", "best") and self.kept is None:
            result = None
            if self.action == "best" and self.task:
                result = self.start_task if step == 0 and self.start_task is not None else self.task(model)
            self._keep(model, step, self.base_nll if step == 0 else self.measure(model), result)

    def _keep(self, model, step: int, nll: float, result: dict | None) -> None:
        self.kept = {"step": step, "weights": dict(tree_flatten(model.trainable_parameters())),
                     "general_nll": nll, "task": result["value"] if result else None, "task_result": result}

    def check(self, model, step: int) -> dict:
        """Measure at this step; returns the record to log (general_nll, increase, within)."""
        nll = self.measure(model)
        increase = (nll - self.base_nll) / self.base_nll
        within = self.budget is None or increase <= self.budget
        record = {"general_nll": nll, "general_nll_increase": increase, "within_budget": within}
        if self.budget is not None:
            record["budget"] = self.budget
        if within and self.action in ("stop", "best"):
            result = self.task(model) if self.action == "best" and self.task else None
            score = result["value"] if result else None
            if score is not None:
                record["task"] = score
            better = self.kept is None or self.action == "stop" or (score or 0) >= (self.kept["task"] or 0)
            if better:
                self._keep(model, step, nll, result)
        if not within and self.over_since is None:
            self.over_since = step
        self.history.append({"step": step, **record})
        return record

    @property
    def stop(self) -> bool:
        return self.action == "stop" and self.over_since is not None

    @property
    def restores(self) -> bool:
        """Whether `restore` puts kept weights back: best always, stop once over budget, warn never."""
        return self.action != "warn" and self.kept is not None and not (
            self.action == "stop" and self.over_since is None)

    def restore(self, model) -> dict | None:
        """Put the kept checkpoint's weights back (stop / best); returns what was kept."""
        if not self.restores:
            return None
        model.load_weights(list(self.kept["weights"].items()), strict=False)
        return self._kept_record()

    def final_nll(self) -> float | None:
        """The general NLL a check measured on the weights the stage ends with (after `restore`); None when no
        check did (the pipeline then measures them itself)."""
        if not self.history:
            return None
        step = self.kept["step"] if self.restores else self.history[-1]["step"]
        return next((h["general_nll"] for h in self.history if h["step"] == step), None)

    def final_task(self) -> dict | None:
        """The task result measured on the weights the stage ends with (action best: the kept checkpoint's);
        None when no one measured them here (the pipeline then measures them itself)."""
        return self.kept.get("task_result") if self.restores else None

    def _kept_record(self) -> dict:
        """What was kept, for logs and the manifest: not the arrays, nor the whole task result."""
        return {k: v for k, v in self.kept.items() if k not in ("weights", "task_result")}

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        kept = self._kept_record() if self.kept else None
        return {"base_nll": self.base_nll, "budget": self.budget, "action": self.action, "checks": self.history,
                "over_budget_from_step": self.over_since, "last": last, "kept": kept, "final_nll": self.final_nll()}
