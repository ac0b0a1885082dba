"""train(): set-up, the loop (progress, metrics, eval, checkpoints), exact resume, final eval.

Reads top to bottom like the steps of a run. A run directory holds ``config.yaml`` (resolved),
``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``eval/`` and ``train_summary.json``
(the report is built from them by ``moe.report``, after training: ``moe train`` calls it).
Only the primary process writes files other than its checkpoint shards.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moe import config as cfg
from moe import runfiles as rf
from moe.data.pipeline import RunData, prepare
from moe.errors import UserError
from moe.training import build
from moe.training import state as state_lib
from moe.training.checkpoint import Checkpointer
from moe.training.evaluation import Evaluator
from moe.training.metrics_log import MetricsLog
from moe.training.projection import pod_summary
from moe.training.restore import restore
from moe.training.sharding import Placement
from moe.training.step import make_train_step


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


def train(
    exp: cfg.Experiment, run_dir: Path, *, progress: bool = True, teacher=None
) -> rf.TrainSummary:
    """Train (or resume) ``exp`` in ``run_dir``, then evaluate it (``eval/summary.json``);
    returns the train summary (also ``train_summary.json``). ``teacher`` (``moe distill``: a
    ``moe.serving.distill.Teacher``) is passed to every step, whose loss then distils it."""
    primary = jax.process_index() == 0
    say = functools.partial(print, file=sys.stderr) if primary else (lambda *a, **k: None)
    if exp.model.weight_bits:
        raise UserError(f"{exp.name} is a quantised model (model.weight_bits): inference only")
    _prepare_run_dir(exp, run_dir, primary)

    # --- Input pipeline -----------------------------------------------------------------------
    data = prepare(exp, say=say)
    if primary:  # the run's own copy of its vocabulary (moe translate reads it)
        shutil.copyfile(data.vocab.path, run_dir / rf.VOCAB_FILE)

    # --- Mesh, model and state (parameters born sharded) -----------------------------------------
    placement = Placement.for_experiment(exp)
    state = placement.init_state()
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
        state, meta = ckpt.restore(latest, placement.abstract_state)
        examples_seen += np.asarray(meta.get("examples_seen", 0), np.int64)
        say(f"moe: resuming from step {latest}")
    start = int(jax.device_get(state.step))

    # --- Update step ---------------------------------------------------------------------------
    hook = () if teacher is None else (teacher,)  # moe distill: one more step argument
    step_fn = placement.jit_train_step(
        make_train_step(exp, placement.graphdef, placement.optimizer, len(data.tasks)), len(hook)
    )
    key = jax.random.key(exp.train.seed)
    evaluator = Evaluator(exp, data, placement)

    # --- Loop ----------------------------------------------------------------------------------
    log = MetricsLog(run_dir, data.task_names, enabled=primary, start_step=start)
    bar = _progress(exp.train.steps, start, progress and primary)
    t0, tokens_seen, timed_steps, timed_s = time.time(), 0, 0, 0.0
    last_step_t = time.time()
    for step in range(start, exp.train.steps):
        host = host_batch(data, step)
        batch = placement.batch(host)
        state, metrics = step_fn(state, batch, key, *hook)
        tokens = int((host["tgt_out"] != 0).sum()) * jax.process_count()
        # The global batch's tasks: the same on every process (each feeds only its rows).
        examples_seen += np.bincount(data.batcher.plan(step)[0], minlength=len(data.tasks))
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
            result, _ = evaluator.perplexities(state.params, "valid")
            log.eval(done, result, "valid")
        if exp.checkpoint.every and done % exp.checkpoint.every == 0:
            ckpt.save(done, state, {"examples_seen": examples_seen.tolist()})
    bar.close()
    if ckpt.latest_step() != exp.train.steps:
        ckpt.save(exp.train.steps, state, {"examples_seen": examples_seen.tolist()})
    wall = time.time() - t0

    # --- Summary and final evaluation ----------------------------------------------------------
    compiled = step_fn.lower(state, placement.batch(host_batch(data, 0)), key, *hook).compile()
    measured = 1000 * timed_s / timed_steps if timed_steps else None
    summary = rf.TrainSummary(
        steps=exp.train.steps,
        resumed_from=latest,
        wall_time_s=wall,
        tokens_per_second=tokens_seen / max(wall, 1e-9),
        step_time_ms=measured,
        skipped_steps=int(jax.device_get(state.skipped)),
        examples_seen=dict(zip(data.task_names, examples_seen.tolist())),
        data=data.stats,
        pod=rf.PodSummary(**pod_summary(exp, placement, compiled, measured)),
    )
    if primary:
        rf.write_json(run_dir / "train_summary.json", summary)
    result = evaluator.full(run_dir, state.params, exp.eval.split, exp.train.steps)
    log.eval(exp.train.steps, result.tasks, exp.eval.split)
    log.close()
    ckpt.close()
    return summary


def host_batch(data: RunData, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of ``step``."""
    return data.batcher.process_batch(step, jax.process_index(), jax.process_count())


def evaluate_checkpoint(run_dir: Path, *, step=None, split=None) -> rf.EvalSummary:
    """`moe eval RUN_DIR`: restore a checkpoint and run the full evaluation."""
    restored = restore(run_dir, step)
    exp = restored.exp
    data = prepare(exp, say=lambda *a, **k: None)
    log = MetricsLog(run_dir, data.task_names, enabled=jax.process_index() == 0, start_step=None)
    split = split or exp.eval.split
    evaluator = Evaluator(exp, data, restored.placement)
    result = evaluator.full(run_dir, restored.params, split, restored.step)
    log.eval(restored.step, result.tasks, split)
    log.close()
    return result


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
