"""metrics.jsonl and TensorBoard events for a run (written by the primary process only).

Train lines: ``{"kind": "train", "step", "time", "loss", "lr", "tokens_per_second",
"step_time_ms", "tasks": {name: {"loss", "tokens"}}, "moe": {layer: {"aux_loss", "z_loss",
"dropped_fraction", "load_cv", "expert_load": [E]...}}}``; eval lines: ``{"kind": "eval",
"step", "tasks": {name: {"loss", "perplexity", "bleu"?}}}``. On resume, lines past the resumed
step (written by the interrupted run after its last checkpoint) are dropped so the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np


def _floats(x: Any) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else [float(v) for v in arr.reshape(-1)]


def moe_layer_stats(moe: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-layer routing stats as JSON-ready floats, with the load CV (std/mean of load)."""
    out = {}
    for layer, stats in moe.items():
        row = {k: _floats(v) for k, v in stats.items()}
        load = np.asarray(stats.get("expert_load", []), dtype=np.float64).reshape(-1)
        if load.size and load.mean() > 0:
            row["load_cv"] = float(load.std() / load.mean())
        out[layer] = row
    return out


class MetricsLog:
    def __init__(
        self, run_dir: Path, task_names: list[str], *, enabled: bool, start_step: int | None = 0
    ):
        """``start_step``: drop lines past it (a resumed run); None appends (``moe eval``)."""
        self.task_names, self.enabled = task_names, enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.exists() and start_step is not None:
            keep = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        from tensorboardX import SummaryWriter

        purge = None if start_step is None else start_step + 1
        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, step: int, m: dict[str, Any], **extra: float) -> None:
        if not self.enabled:
            return
        tasks = {}
        for i, name in enumerate(self.task_names):
            n = float(m["task_tokens"][i])
            if n > 0:
                tasks[name] = {"loss": float(m["task_nll"][i]) / n, "tokens": n}
        record = {
            "kind": "train",
            "step": step,
            "time": time.time(),
            "loss": float(m["loss"]),
            "ce": float(m["ce"]),
            "aux_loss": float(m["aux_loss"]),
            "z_loss": float(m["z_loss"]),
            "grad_norm": float(m["grad_norm"]),
            **{k: float(v) for k, v in extra.items()},
            "tasks": tasks,
            "moe": moe_layer_stats(m.get("moe", {})),
        }
        self._write(record)
        for key in ("loss", "ce", "aux_loss", "z_loss", "grad_norm", *extra):
            self._tb.add_scalar(f"train/{key}", record[key], step)
        for name, t in tasks.items():
            self._tb.add_scalar(f"train/{name}/loss", t["loss"], step)
            self._tb.add_scalar(f"train/{name}/perplexity", math.exp(min(t["loss"], 50)), step)
        for layer, s in record["moe"].items():
            for key in ("load_cv", "dropped_fraction", "z_loss", "aux_loss"):
                if isinstance(s.get(key), float):
                    self._tb.add_scalar(f"moe/{layer}/{key}", s[key], step)

    def eval(self, step: int, tasks: dict[str, dict[str, Any]]) -> None:
        if not self.enabled:
            return
        keep = ("loss", "perplexity", "bleu")
        slim = {
            n: {k: v for k, v in t.items() if k in keep and v is not None} for n, t in tasks.items()
        }
        self._write({"kind": "eval", "step": step, "time": time.time(), "tasks": slim})
        for name, t in slim.items():
            for key, value in t.items():
                self._tb.add_scalar(f"eval/{name}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
