"""The promotion gate: thresholds a checkpoint must meet before it is handed to serving.

A gates file names thresholds as `<metric>_max` or `<metric>_min` under `[thresholds]`:

    [thresholds]
    eval_loss_max = 5.0

    task_accuracy_min = 0.5

    [task]            # optional: which verifiable task task_accuracy uses (posttrain.tasks)
    name = "arithmetic"
    digits = 2

Each metric is measured on the checkpoint itself: eval loss through `Trainer.evaluate`, on the
same held-out batches training reports, and task accuracy with greedy decoding on the task's
held-out problems, as post-training reports it; so the number that promotes a model is the
number the run's dashboards showed. A metric we cannot measure is refused when the file is read,
not skipped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from archipelago.errors import UserError
from island.model import Transformer
from island.train import Trainer, TrainJobConfig


class GateError(UserError):
    """A gates file that cannot be used, or a checkpoint that fails it."""


def eval_loss(model: Transformer, job: TrainJobConfig, task: Any) -> float:
    """Mean loss over the job's fixed held-out batches."""
    return Trainer(job, model=model).evaluate()


def task_accuracy(model: Transformer, job: TrainJobConfig, task: Any) -> float:
    """Greedy accuracy on the held-out problems of the gate's task."""
    from island.data import open_dataset
    from posttrain.rollout import RolloutConfig, RolloutEngine, accuracy

    engine = RolloutEngine(model, open_dataset(job.data).tokenizer, RolloutConfig(temperature=0.0))
    built = task.build()
    return accuracy(engine, built, built.problems("heldout", task.heldout_problems, task.seed))


METRICS: dict[str, Callable[[Transformer, TrainJobConfig, Any], float]] = {
    "eval_loss": eval_loss, "task_accuracy": task_accuracy}


@dataclass(frozen=True)
class Threshold:
    metric: str
    bound: str  # "max" | "min"
    value: float
    task: Any = None  # the TaskConfig of task_accuracy

    @property
    def key(self) -> str:
        return f"{self.metric}_{self.bound}"

    def passes(self, measured: float) -> bool:
        if math.isnan(measured):
            return False
        return measured <= self.value if self.bound == "max" else measured >= self.value


def load_gate(path: str | Path) -> list[Threshold]:
    """The thresholds of a gates file; every one must name a metric we can measure."""
    path = Path(path)
    if not path.is_file():
        raise GateError(f"gates file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GateError(f"gates file {path} is not valid TOML: {exc}") from exc
    task = None
    if "task" in table:
        from archipelago.config import ConfigError, build
        from posttrain.tasks import TaskConfig

        try:
            task = build(TaskConfig, table["task"]) if isinstance(table["task"], dict) else None
        except ConfigError as exc:
            raise GateError(f"{path}: [task]: {exc}") from exc
        if task is None:
            raise GateError(f"{path}: [task] must be a table")
    raw = table.get("thresholds")
    if not isinstance(raw, dict) or not raw:
        raise GateError(f"gates file {path} has no [thresholds] table")
    out = []
    for key, value in raw.items():
        metric, _, bound = key.rpartition("_")
        if bound not in ("max", "min") or not metric:
            raise GateError(f"{path}: threshold '{key}' must end in _max or _min")
        if metric not in METRICS:
            raise GateError(f"{path}: threshold '{key}' names metric '{metric}', which cannot be "
                            f"measured yet (known: {', '.join(METRICS)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GateError(f"{path}: threshold '{key}' must be a number, got {value!r}")
        if metric == "task_accuracy" and task is None:
            from posttrain.tasks import TaskConfig

            task = TaskConfig()
        out.append(Threshold(metric, bound, float(value), task if metric == "task_accuracy" else None))
    return out


def evaluate(thresholds: list[Threshold], model: Transformer, job: TrainJobConfig) -> dict[str, float]:
    """Measure each metric the thresholds need, once."""
    first = {t.metric: t for t in reversed(thresholds)}
    return {metric: METRICS[metric](model, job, first[metric].task)
            for metric in dict.fromkeys(t.metric for t in thresholds)}


def check(thresholds: list[Threshold], metrics: dict[str, float]) -> None:
    """Raise GateError naming the first failed metric, its value and the threshold."""
    for t in thresholds:
        measured = metrics[t.metric]
        if not t.passes(measured):
            relation = ">" if t.bound == "max" else "<"
            raise GateError(f"promotion gate failed: {t.metric} = {measured:.4f} {relation} "
                            f"{t.key} = {t.value:g}; nothing was written")


def promotion_record(thresholds: list[Threshold], metrics: dict[str, float], checkpoint: Path,
                     manifest: dict[str, Any]) -> dict[str, Any]:
    """What promotion.json holds: which checkpoint, what it measured, against what."""
    return {
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(checkpoint),
        "checkpoint_step": manifest.get("step"),
        "checkpoint_sha256": manifest.get("files", {}),
        "metrics": metrics,
        "thresholds": {t.key: t.value for t in thresholds},
        "task": next((dataclasses.asdict(t.task) for t in thresholds if t.task is not None), None),
        "passed": True,
    }
