"""train(): set-up, the loop (progress, metrics, eval, checkpoints), exact resume, final report.

Reads top to bottom like the steps of a run. A run directory holds ``config.yaml`` (resolved),
``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``eval/``, ``train_summary.json`` and
the report. Only the primary process writes files other than its checkpoint shards.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moe import config as cfg
from moe.errors import UserError
from moe.training import build, run_eval
from moe.training import state as state_lib
from moe.training.checkpoint import Checkpointer
from moe.training.metrics_log import MetricsLog
from moe.training.prepare import prepare
from moe.training.sharding import Placement
from moe.training.step import LossWeights, train_step


class RunError(UserError):
    """The run cannot go on (e.g. the loss stayed non-finite); one line for the user."""


# The parts of the experiment that must match for a run directory to be resumed.
_RESUME_KEYS = ("model", "moe", "tasks", "data", "mixture", "pod")


def _prepare_run_dir(exp: cfg.Experiment, run_dir: Path, primary: bool) -> None:
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = cfg.load(saved).model_dump(mode="json")
        new = exp.model_dump(mode="json")
        changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
        if changed:
            raise UserError(
                f"{run_dir} holds a run of a different experiment ({changed[0]} differs); "
                "choose another name or delete the directory"
            )
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(cfg.dump(exp), encoding="utf-8")
        tmp.replace(saved)


def train(exp: cfg.Experiment, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) ``exp`` in ``run_dir``; returns the train summary."""
    primary = jax.process_index() == 0
    say = functools.partial(print, file=sys.stderr) if primary else (lambda *a, **k: None)
    _prepare_run_dir(exp, run_dir, primary)

    # --- Input pipeline -----------------------------------------------------------------------
    data = prepare(exp, say=say)

    # --- Mesh, model and state (parameters born sharded) -----------------------------------------
    placement = Placement.for_experiment(exp)
    optimizer = build.build_optimizer(exp)
    graphdef, state = placement.init_state(lambda: build.build_model(exp), optimizer)
    say(
        f"moe: {exp.name}: {state_lib.num_params(state.params) / 1e6:.2f}M parameters, "
        f"{len(data.tasks)} tasks, mesh {dict(placement.mesh.shape)}, "
        f"{jax.process_count()} process(es)"
    )

    # --- Restore -------------------------------------------------------------------------------
    ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep)
    latest = ckpt.latest_step()
    examples_seen = np.zeros(len(data.tasks), np.int64)
    if latest is not None:
        state, meta = ckpt.restore(latest, placement.abstract(state))
        examples_seen += np.asarray(meta.get("examples_seen", 0), np.int64)
        say(f"moe: resuming from step {latest}")
    start = int(jax.device_get(state.step))

    # --- Update step ---------------------------------------------------------------------------
    weights = LossWeights(aux=exp.moe.aux_loss_weight, z=exp.moe.z_loss_weight)
    step_fn = placement.jit_train_step(
        functools.partial(
            train_step,
            graphdef=graphdef,
            optimizer=optimizer,
            weights=weights,
            num_tasks=len(data.tasks),
            accum=exp.train.grad_accum,
        ),
        state,
    )
    key = jax.random.key(exp.train.seed)

    # --- Loop ----------------------------------------------------------------------------------
    log = MetricsLog(run_dir, data.task_names, enabled=primary, start_step=start)
    bar = _progress(exp.train.steps, start, progress and primary)
    t0, tokens_seen, timed_steps, timed_s = time.time(), 0, 0, 0.0
    last_step_t = time.time()
    for step in range(start, exp.train.steps):
        host = data.batcher.process_batch(step, jax.process_index(), jax.process_count())
        batch = placement.batch(host)
        state, metrics = step_fn(state, batch, key)
        tokens = int((host["tgt_out"] != 0).sum()) * jax.process_count()
        examples_seen += np.bincount(host["task"], minlength=len(data.tasks))
        tokens_seen += tokens
        done = step + 1
        if done % exp.train.log_every == 0 or done == exp.train.steps:
            m = jax.device_get(metrics)  # waits for the step: timing below is real
            now = time.time()
            if done - start > exp.train.log_every:  # the first window includes compilation
                timed_steps += exp.train.log_every
                timed_s += now - last_step_t
            rate = tokens_seen / max(now - t0, 1e-9)
            log.train(
                done,
                m,
                lr=float(build.learning_rate(exp)(done)),
                tokens_per_second=rate,
                step_time_ms=1000 * (now - last_step_t) / exp.train.log_every,
            )
            last_step_t = now
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{rate:,.0f}")
            if isinstance(bar, _NoBar) and done % _every_tenth(exp) == 0:
                say(
                    f"moe: step {done}/{exp.train.steps} loss {float(m['loss']):.3f} "
                    f"{rate:,.0f} tokens/s"
                )
            if int(jax.device_get(state.bad_steps)) > exp.train.max_bad_steps:
                raise RunError(
                    f"loss or gradients non-finite for {exp.train.max_bad_steps}+ consecutive "
                    f"steps at step {done}; the last good checkpoint is kept in "
                    f"{run_dir / 'checkpoints'} (lower train.learning_rate?)"
                )
        bar.update(1)
        if exp.eval.every and done % exp.eval.every == 0 and done < exp.train.steps:
            result = run_eval.perplexities(exp, data, placement, graphdef, state.params, "valid")
            result.pop("_expert_usage")
            log.eval(done, result)
        if exp.checkpoint.every and done % exp.checkpoint.every == 0:
            ckpt.save(done, state, {"examples_seen": examples_seen.tolist()})
    bar.close()
    if ckpt.latest_step() != exp.train.steps:
        ckpt.save(exp.train.steps, state, {"examples_seen": examples_seen.tolist()})
    wall = time.time() - t0

    # --- Final evaluation and report ---------------------------------------------------------
    summary = {
        "steps": exp.train.steps,
        "resumed_from": latest,
        "wall_time_s": wall,
        "tokens_per_second": tokens_seen / max(wall, 1e-9),
        "step_time_ms": 1000 * timed_s / timed_steps if timed_steps else None,
        "skipped_steps": int(jax.device_get(state.skipped)),
        "examples_seen": dict(zip(data.task_names, examples_seen.tolist())),
        "data": data.stats,
        "pod": placement.pod_summary(exp, step_fn, state, key, data, timed_s, timed_steps),
    }
    if primary:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    _final_eval(
        exp, run_dir, data, placement, graphdef, state.params, log, exp.eval.split, exp.train.steps
    )
    log.close()
    ckpt.close()
    return summary


def _final_eval(exp, run_dir, data, placement, graphdef, params, log, split, step) -> None:
    result = run_eval.full(exp, run_dir, data, placement, graphdef, params, split, step)
    log.eval(step, result["tasks"])
    if jax.process_index() == 0:
        from moe.training.report import build as build_report

        build_report(run_dir)
        print(f"moe: report: {run_dir / 'report.md'}", file=sys.stderr)


def evaluate_checkpoint(exp: cfg.Experiment, run_dir: Path, *, step=None, split=None) -> None:
    """`moe eval RUN_DIR`: restore a checkpoint and run the full evaluation + report."""
    from moe.training import surgery

    restored = surgery.restore(run_dir, step)
    data = prepare(restored.exp, say=lambda *a, **k: None)
    log = MetricsLog(run_dir, data.task_names, enabled=jax.process_index() == 0, start_step=None)
    _final_eval(
        restored.exp,
        run_dir,
        data,
        restored.placement,
        restored.graphdef,
        restored.params,
        log,
        split or exp.eval.split,
        restored.step,
    )
    log.close()


def _every_tenth(exp: cfg.Experiment) -> int:
    """Log-step multiple closest to a tenth of the run, for plain progress lines."""
    every = exp.train.log_every
    return max(every, (exp.train.steps // 10) // every * every)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
