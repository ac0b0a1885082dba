"""metrics.jsonl and TensorBoard events for a run (written by the primary process only), and
the progress lines printed where there is no bar (``Ticker``).

Lines are ``moe.runfiles.TrainLine`` (loss, lr, throughput, per-task loss, per-MoE-layer routing
stats) and ``EvalLine`` (per-task loss, perplexity, BLEU). On resume, lines past the resumed
step (written by the interrupted run after its last checkpoint) are dropped so the file reads as
one uninterrupted run; a line cut short by an interrupt is dropped too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from pydantic import BaseModel

from moe import runfiles as rf


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


# Above this many tasks, train lines carry no per-task losses (109 tasks x every log line would
# make most of the file); the per-task figures come with every evaluation (eval lines).
TRAIN_LINE_TASKS = 32


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
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                if _step(line) is not None and _step(line) <= start_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        from tensorboardX import SummaryWriter

        purge = None if start_step is None else start_step + 1
        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)

    def _write(self, line: BaseModel) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line.model_dump_json() + "\n")

    def train(self, step: int, m: dict[str, Any], steps: int = 1, **extra: float) -> None:
        """Log the metrics of a window: ``m`` holds their sums over ``steps`` steps (per-task
        NLL and tokens stay sums; everything else is logged as the window's mean)."""
        if not self.enabled:
            return
        m = {k: v if k in ("task_nll", "task_tokens") else _mean(v, steps) for k, v in m.items()}
        tasks = {}
        names = self.task_names if len(self.task_names) <= TRAIN_LINE_TASKS else ()
        for i, name in enumerate(names):
            n = float(m["task_tokens"][i])
            if n > 0:
                tasks[name] = rf.TaskLoss(loss=float(m["task_nll"][i]) / n, tokens=n)
        scalars = {k: float(m[k]) for k in ("loss", "ce", "aux_loss", "z_loss", "grad_norm")}
        scalars.update({k: float(v) for k, v in extra.items() if v is not None})
        line = rf.TrainLine(
            step=step,
            time=time.time(),
            **scalars,
            tasks=tasks,
            moe=moe_layer_stats(m.get("moe", {})),
        )
        self._write(line)
        for key, value in scalars.items():
            self._tb.add_scalar(f"train/{key}", value, step)
        for name, t in tasks.items():
            self._tb.add_scalar(f"train/{name}/loss", t.loss, step)
            self._tb.add_scalar(f"train/{name}/perplexity", math.exp(min(t.loss, 50)), step)
        for layer in line.moe:
            for key in ("load_cv", "dropped_fraction", "z_loss", "aux_loss", "device_fanout"):
                value = line.layer_stat(layer, key)
                if value is not None:
                    self._tb.add_scalar(f"moe/{layer}/{key}", value, step)

    def eval(self, step: int, tasks: dict[str, rf.TaskEval], split: str) -> None:
        if not self.enabled:
            return
        slim = {
            n: rf.EvalMetrics(loss=t.loss, perplexity=t.perplexity, bleu=t.bleu, chrf=t.chrf)
            for n, t in tasks.items()
        }
        self._write(rf.EvalLine(step=step, time=time.time(), split=split, tasks=slim))
        for name, t in slim.items():
            for key, value in t.model_dump().items():
                if value is not None:
                    self._tb.add_scalar(f"eval/{name}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# Metrics that are a state, not a per-step figure: the window keeps the last step's value.
LAST_VALUE = ("router_bias",)


def accumulate(window: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """A window's metrics after one more step: sums, except ``LAST_VALUE`` ones (jit it)."""

    def one(path, a, b):
        last = jax.tree_util.keystr(path[-1:], simple=True) in LAST_VALUE
        return b if last else a + b

    return jax.tree_util.tree_map_with_path(one, window, step)


def _mean(value: Any, steps: int, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mean(v, steps, k) for k, v in value.items()}
    return np.asarray(value, np.float64) / (1 if key in LAST_VALUE else steps)


def _step(line: str) -> int | None:
    """The step of a metrics line, None for a blank or malformed one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class Ticker:
    """When to print a progress line without a bar (under mpirun, or to a pipe): at each tenth
    of the run and at least every ``seconds``; the line has the steady-state speed and an ETA
    (compile, evaluation and checkpoints excluded)."""

    def __init__(self, total: int, every: int, enabled: bool, seconds: float = 30.0):
        self.total, self.every, self.enabled, self.seconds = total, every, enabled, seconds
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        now = time.perf_counter()
        if not self.enabled or not (done % self.every == 0 or now - self.last >= self.seconds):
            return False
        self.last = now
        return True

    def line(self, done: int, loss: float, rate: float | None, step_ms: float | None) -> str:
        text = f"moe: step {done}/{self.total} ({done / self.total:.0%}) loss {loss:.3f}"
        if rate and step_ms:
            eta = (self.total - done) * step_ms / 1000
            text += f", {rate:,.0f} tok/s (steady), {step_ms:.0f} ms/step, ETA {_hms(eta)}"
        return text


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
