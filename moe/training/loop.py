"""train(): set-up, the loop (progress, metrics, eval, checkpoints), exact resume, final eval.

Reads top to bottom like the steps of a run. A run directory holds ``config.yaml`` (resolved),
``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``eval/`` and ``train_summary.json``
(the report is built from them by ``moe.report``, after training: ``moe train`` calls it).
Only the primary process writes files other than its checkpoint shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moe import config as cfg
from moe import rundir
from moe import runfiles as rf
from moe.data.pipeline import RunData, prepare
from moe.data.prefetch import Prefetcher
from moe.errors import UserError
from moe.pod.calibrate import matmul_rate
from moe.pod.hlo import program_cost
from moe.training import build
from moe.training import state as state_lib
from moe.training.checkpoint import Checkpointer
from moe.training.evaluation import Evaluator, score_lines
from moe.training.metrics_log import MetricsLog, Ticker, accumulate
from moe.training.projection import pod_summary
from moe.training.restore import restore
from moe.training.sharding import Placement
from moe.training.step import make_train_step


class RunError(UserError):
    """The run cannot go on (e.g. the loss stayed non-finite); one line for the user."""


# The parts of the experiment that must match for a run directory to be resumed.
_RESUME_KEYS = ("model", "moe", "tasks", "data", "mixture", "pod")


def _check_run_dir(exp: cfg.Experiment, run_dir: Path) -> None:
    """A run directory with checkpoints resumes only the same experiment. Without one (a first
    run that failed before saving anything) the new config simply replaces the old."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and rundir.checkpoint_steps(run_dir):
        old = cfg.load(saved).model_dump(mode="json")
        new = exp.model_dump(mode="json")
        changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
        if changed:
            raise UserError(
                f"{run_dir} holds a run of a different experiment ({changed[0]} differs); "
                "choose another name or delete the directory"
            )


def _write_config(exp: cfg.Experiment, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(cfg.dump(exp), encoding="utf-8")
    tmp.replace(saved)


def _finished(exp: cfg.Experiment, run_dir: Path) -> rf.TrainSummary | None:
    """The train summary of a run that is complete for ``exp`` (its last checkpoint is at
    ``train.steps`` and its final evaluation, with the same eval settings, is written), else
    None. Read before ``config.yaml`` is rewritten."""
    saved, path = run_dir / "config.yaml", run_dir / "train_summary.json"
    if not (saved.is_file() and (run_dir / "checkpoints" / str(exp.train.steps)).is_dir()):
        return None
    summary, problem = rf.read_json(path, rf.TrainSummary)
    final, problem2 = rf.read_json(run_dir / "eval" / "summary.json", rf.EvalSummary)
    old = cfg.load(saved).model_dump(mode="json")
    new = exp.model_dump(mode="json")
    same = all(old.get(k) == new.get(k) for k in (*_RESUME_KEYS, "eval"))
    done = summary.steps == final.step == exp.train.steps and final.split == exp.eval.split
    return summary if same and done and not problem and not problem2 else None


def train(
    exp: cfg.Experiment, run_dir: Path, *, progress: bool = True, teacher=None
) -> rf.TrainSummary:
    """Train (or resume) ``exp`` in ``run_dir``, then evaluate it (``eval/summary.json``);
    returns the train summary (also ``train_summary.json``). ``teacher`` (``moe distill``: a
    ``moe.serving.distill.Teacher``) is passed to every step, whose loss then distils it.
    The primary process holds the run directory's lock (``moe.rundir``) throughout."""
    if exp.model.weight_bits:
        raise UserError(f"{exp.name} is a quantised model (model.weight_bits): inference only")
    lock = rundir.acquire(run_dir) if jax.process_index() == 0 else None
    try:
        return _train(exp, Path(run_dir), progress, teacher)
    finally:
        rundir.release(lock)


def _train(exp: cfg.Experiment, run_dir: Path, progress: bool, teacher) -> rf.TrainSummary:
    primary = jax.process_index() == 0
    say = functools.partial(print, file=sys.stderr) if primary else (lambda *a, **k: None)
    clock = _Clock(say)
    finished = _finished(exp, run_dir)  # read before config.yaml is rewritten
    _check_run_dir(exp, run_dir)
    if finished is not None:  # trained and evaluated already: nothing to repeat or append
        say(
            f"moe: {run_dir} is trained to step {exp.train.steps} and evaluated on the "
            f"{exp.eval.split} split already; nothing to do (raise train.steps to train on, "
            f"`moe eval {run_dir}` evaluates again)"
        )
        return finished

    # --- Input pipeline (the primary first measures this host's matmul rate, once: the other
    # processes wait for it to build the data anyway) ---------------------------------------------
    cache = Path(exp.data.cache_dir)
    host_rate = matmul_rate(cache / "matmul_rate.json") if primary else None
    with clock("data", "input data ready"):
        data = prepare(exp, say=say)
    if primary:  # the data is good: the run really starts (config.yaml, its vocabulary)
        _write_config(exp, run_dir)
        shutil.copyfile(data.vocab.path, run_dir / rf.VOCAB_FILE)

    # --- Mesh, model and state (parameters born sharded); restore ------------------------------
    with clock("init", "model state ready"):
        placement = Placement.for_experiment(exp)
        state = placement.init_state()
        ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep)
        restored = ckpt.restore_newest(placement.abstract_state, say)
        latest = restored and restored[0]
        examples_seen = np.zeros(len(data.tasks), np.int64)
        if restored:
            _, state, meta = restored
            examples_seen += np.asarray(meta.get("examples_seen", 0), np.int64)
    say(
        f"moe: {exp.name}: {state_lib.num_params(state.params) / 1e6:.2f}M parameters, "
        f"{len(data.tasks)} tasks, mesh {dict(placement.mesh.shape)}, "
        f"{jax.process_count()} process(es)" + (f"; resuming from step {latest}" if latest else "")
    )
    start = int(jax.device_get(state.step))

    # --- Update step ---------------------------------------------------------------------------
    hook = () if teacher is None else (teacher,)  # moe distill: one more step argument
    step_fn = placement.jit_train_step(
        make_train_step(exp, placement.graphdef, placement.optimizer, len(data.tasks)), len(hook)
    )
    add = jax.jit(accumulate)  # metrics summed on device between log lines
    key = jax.random.key(exp.train.seed)
    evaluator = Evaluator(exp, data, placement)

    # --- Loop: host batches made ahead in a thread; metrics stay on device between logs --------
    log = MetricsLog(run_dir, data.task_names, enabled=primary, start_step=start)
    bar = _progress(exp.train.steps, start, progress and primary)
    ticker = Ticker(exp.train.steps, _every_tenth(exp), isinstance(bar, _NoBar))
    window, totals, acc, summed = _Window(), _Totals(), None, 0
    batches = Prefetcher(lambda s: _host_step(data, s), start, exp.train.steps)
    try:
        for step, (host, counts) in batches:
            state, metrics = step_fn(state, placement.batch(host), key, *hook)
            acc, summed = (metrics if acc is None else add(acc, metrics)), summed + 1
            examples_seen += counts.examples
            totals.add(counts)
            window.add(counts)
            done = step + 1
            if step == start:  # the first step compiles: time it apart, start the clock after
                jax.block_until_ready(state)
                clock.add("compile", window.restart())
                say(f"moe: compiled the train step and ran step {done} in {_s(clock, 'compile')}")
            if done % exp.train.log_every == 0 or done == exp.train.steps:
                m = jax.device_get(acc)  # waits for the window's steps: the timing is real
                seconds, steps, tokens = window.close()
                totals.time(seconds, steps)
                log.train(
                    done,
                    m,
                    steps=summed,
                    lr=float(build.learning_rate(exp)(done)),
                    tokens_per_second=tokens / seconds if steps else None,
                    step_time_ms=1000 * seconds / steps if steps else None,
                )
                loss = float(m["loss"]) / summed
                acc, summed = None, 0
                rate = totals.tokens_per_second()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate or 0:,.0f}")
                if ticker.due(done):  # no bar (mpirun, a pipe): a line now and then, with ETA
                    say(ticker.line(done, loss, rate, totals.step_ms()))
                if int(jax.device_get(state.bad_steps)) > exp.train.max_bad_steps:
                    good = ckpt.latest_step()
                    kept = (
                        f"the last good checkpoint (step {good}) is kept in {ckpt.directory}"
                        if good is not None
                        else "no checkpoint was written"
                    )
                    raise RunError(
                        f"loss, gradients or update non-finite or exploding for "
                        f"{exp.train.max_bad_steps}+ consecutive steps at step {done}; {kept} "
                        "(lower train.learning_rate?)"
                    )
            bar.update(1)
            if exp.eval.every and done % exp.eval.every == 0 and done < exp.train.steps:
                with clock("eval"), window.paused(state):
                    t0 = time.perf_counter()
                    result, _ = evaluator.perplexities(state_lib.model_state(state), "valid")
                    log.eval(done, result, "valid")
                    ppl = ", ".join(
                        f"{k} {v.perplexity or float('nan'):.2f}" for k, v in result.items()
                    )
                    say(f"moe: valid perplexity at step {done}: {ppl} ({_s(t0)})")
            # Never while steps are being skipped: the good checkpoints would rotate out.
            if exp.checkpoint.every and done % exp.checkpoint.every == 0 and _good(state):
                with clock("checkpoint"), window.paused(state):
                    ckpt.save(done, state, {"examples_seen": examples_seen.tolist()})
    finally:
        batches.close()
    bar.close()
    clock.add("train", totals.seconds)
    if ckpt.latest_step() != exp.train.steps and _good(state):
        with clock("checkpoint"):
            ckpt.save(exp.train.steps, state, {"examples_seen": examples_seen.tolist()})

    # --- Summary and final evaluation ----------------------------------------------------------
    compiled = step_fn.lower(state, placement.batch(host_batch(data, 0)), key, *hook).compile()
    summary = rf.TrainSummary(
        steps=exp.train.steps,
        resumed_from=latest,
        wall_time_s=clock.since_start(),
        skipped_steps=int(jax.device_get(state.skipped)),
        examples_seen=dict(zip(data.task_names, examples_seen.tolist())),
        data=data.stats,
        pod=rf.PodSummary(**pod_summary(exp, placement, compiled, totals.step_ms())),
        **totals.summary(compiled, host_rate),
    )
    say(f"moe: final evaluation on the {exp.eval.split} split{_decoding(exp)}")
    with clock("final_eval", "final evaluation done"):
        result = evaluator.full(
            run_dir, state_lib.model_state(state), exp.eval.split, exp.train.steps
        )
        log.eval(exp.train.steps, result.tasks, exp.eval.split)
    for line in score_lines(result):
        say(f"moe: {line}")
    summary.timing = clock.timing()
    if primary:
        rf.write_json(run_dir / "train_summary.json", summary)
    log.close()
    ckpt.close()
    return summary


def _good(state) -> bool:
    """The last step was applied (not skipped by the non-finite guard)."""
    return int(jax.device_get(state.bad_steps)) == 0


def host_batch(data: RunData, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of ``step``."""
    return data.batcher.process_batch(step, jax.process_index(), jax.process_count())


@dataclasses.dataclass(frozen=True)
class _Counts:
    """What one global batch holds (from its plan, the same on every process)."""

    examples: np.ndarray  # [tasks]
    target_tokens: int
    source_tokens: int
    positions: int  # source and target positions of the batch


def _host_step(data: RunData, step: int) -> tuple[dict[str, np.ndarray], _Counts]:
    plan = data.batcher.plan(step)
    ls, lt = data.batcher.widths
    counts = _Counts(
        np.bincount(plan.task, minlength=len(data.tasks)),
        int(plan.tgt_len.sum()),
        int(plan.src_len.sum()),
        data.batcher.batch_size * (ls + lt),
    )
    return host_batch(data, step), counts


class _Window:
    """Steps, tokens and seconds since the last log line, evaluation and checkpoints excluded."""

    def __init__(self):
        self.start, self.paused_s, self.steps, self.tokens = time.perf_counter(), 0.0, 0, 0

    def add(self, counts: _Counts) -> None:
        self.steps += 1
        self.tokens += counts.target_tokens

    def restart(self) -> float:
        """Forget the steps so far (the compiling one); returns its seconds."""
        seconds = time.perf_counter() - self.start
        self.__init__()
        return seconds

    def close(self) -> tuple[float, int, int]:
        """(seconds, steps, target tokens) of the window, and start the next one."""
        out = (time.perf_counter() - self.start - self.paused_s, self.steps, self.tokens)
        self.__init__()
        return out

    @contextlib.contextmanager
    def paused(self, state):
        jax.block_until_ready(state)  # the steps before the pause belong to the window
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0


class _Totals:
    """Steady-state figures of the run: timed steps, tokens, examples, padding."""

    def __init__(self):
        self.seconds, self.timed_steps, self.steps = 0.0, 0, 0
        self.examples = self.target = self.source = self.positions = 0

    def add(self, counts: _Counts) -> None:
        self.steps += 1
        self.examples += int(counts.examples.sum())
        self.target += counts.target_tokens
        self.source += counts.source_tokens
        self.positions += counts.positions

    def time(self, seconds: float, steps: int) -> None:
        if steps:
            self.seconds += seconds
            self.timed_steps += steps

    def step_ms(self) -> float | None:
        return 1000 * self.seconds / self.timed_steps if self.timed_steps else None

    def tokens_per_second(self) -> float | None:
        ms = self.step_ms()
        return self.target / self.steps / (ms / 1000) if ms and self.steps else None

    def summary(self, compiled, host_rate: float | None) -> dict:
        flops = program_cost(compiled).flops * jax.device_count()  # per device x devices
        ms = self.step_ms()
        return {
            "tokens_per_second": self.tokens_per_second(),
            "step_time_ms": ms,
            "examples_per_step": self.examples / self.steps if self.steps else None,
            "target_tokens_per_step": self.target / self.steps if self.steps else None,
            "padding_fraction": 1 - (self.source + self.target) / self.positions
            if self.positions
            else None,
            "model_flops_per_step": flops,
            "host_matmul_flops": host_rate,
            "flop_utilisation": flops / (ms / 1000) / host_rate if ms and host_rate else None,
            "load_average": os.getloadavg()[0],
        }


class _Clock:
    """Seconds per phase (``with clock("eval"): ...``); with a ``note``, a line saying it ended
    and how long it took."""

    def __init__(self, say=lambda *a, **k: None):
        self.t0, self.phases, self.say = time.perf_counter(), {}, say

    @contextlib.contextmanager
    def __call__(self, phase: str, note: str | None = None):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t)
        if note:
            self.say(f"moe: {note} in {time.perf_counter() - t:.1f} s")

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def since_start(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self) -> rf.Timing:
        return rf.Timing(
            **{f"{k}_s": v for k, v in self.phases.items()}, total_s=self.since_start()
        )


def _s(t0: float | _Clock, phase: str = "") -> str:
    """Seconds since ``t0``, or of a clock's phase, as text."""
    seconds = t0.phases.get(phase, 0.0) if isinstance(t0, _Clock) else time.perf_counter() - t0
    return f"{seconds:.1f} s"


def _decoding(exp: cfg.Experiment) -> str:
    evaluated = [exp.tasks[i] for i in exp.evaluated_tasks()]
    n = sum(t.kind == "translate" for t in evaluated) if exp.eval.bleu_examples else 0
    return f", decoding {exp.eval.bleu_examples} sentences of each of {n} task(s)" if n else ""


def evaluate_checkpoint(
    run_dir: Path, *, step=None, split=None, overrides: tuple[str, ...] = ()
) -> rf.EvalSummary:
    """`moe eval RUN_DIR [eval.key=value ...]`: restore a checkpoint and run the full evaluation
    (``overrides`` change the evaluation settings only: the model is the checkpoint's)."""
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise UserError(f"moe eval takes eval.* overrides only (the model is the run's): {bad[0]}")
    restored = restore(run_dir, step)
    exp = cfg.load(run_dir / "config.yaml", list(overrides)) if overrides else restored.exp
    data = prepare(exp, say=lambda *a, **k: None)
    log = MetricsLog(run_dir, data.task_names, enabled=jax.process_index() == 0, start_step=None)
    split = split or exp.eval.split
    evaluator = Evaluator(exp, data, restored.placement)
    result = evaluator.full(run_dir, restored.model_state, split, restored.step)  # + biases
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
