"""``moe distill RUN_DIR --student STUDENT.yaml --out OUT``: a (dense) student of a trained run.

Knowledge distillation (Hinton, Vinyals & Dean 2015 §2; papers §8.1): the student is trained on

    L = alpha * CE(labels, q_1) + (1 - alpha) * T^2 * KL(p_T || q_T)

per non-pad target token (means over the batch's tokens), where ``p_T = softmax(z_teacher / T)``
and ``q_T = softmax(z_student / T)``. The T^2 keeps the soft term's gradients, which scale as
1/T^2, comparable across temperatures (Hinton §2). ``KL(p || q) = CE(p, q) - H(p)`` has the
gradient of Hinton's soft cross-entropy; the constant ``H(p)`` only makes 0 the optimum. The
Switch Transformer distils a sparse teacher into a dense student with 0.75 on the labels and
0.25 on the teacher, and keeps ~30% of the teacher's gain (Fedus et al. 2021 §4.2, Table 6;
papers §3.6): ``alpha = 0.75`` is the default here.

The teacher is the trained run in evaluation mode (eval capacity, no dropout or jitter), any
router; its logits are computed on the fly inside the student's jitted step (a
:class:`Teacher`, a pytree of its parameters, is an argument of the step: ``moe.training.loop
.train(teacher=...)``), so nothing is cached on disk and the teacher sees exactly the student's
batch. Both models run on one mesh, so the student must keep the teacher's tasks, data,
vocabulary size, sequence lengths and mesh (:func:`check_student`). Training is the ordinary
loop (schedule, checkpoints, evaluation, report), so ``OUT`` is a normal run directory; it also
holds ``distill.json`` (teacher, its step, alpha, T and its final evaluation). Resuming re-runs
the same command: the teacher is deterministic and restored at the recorded step, so a resumed
student matches an uninterrupted one bit for bit. ``init_from_teacher`` starts the student from
the teacher's weights wherever the two models have the same parameter (embedding, attention,
layer norms, dense feed-forwards: Switch's "init non-expert weights from teacher", Table 6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe import config as cfg
from moe import runfiles as rf
from moe.errors import UserError
from moe.pathways import surgery
from moe.training import build
from moe.training.checkpoint import Checkpointer
from moe.training.loop import train
from moe.training.restore import restore
from moe.training.step import segments

INFO = "distill.json"
_SHARED = ("tasks", "data")  # config sections a student must share with its teacher
_MODEL = ("vocab_size", "max_source_length", "max_target_length")


def kd_objective(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    nll: jax.Array,
    mask: jax.Array,
    *,
    alpha: float,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``alpha * CE + (1 - alpha) * T^2 * KL(p_T || q_T)`` (module docstring) and
    ``{"kd_kl": KL}``, both token means over ``mask``.

    Args: logits ``[B, L, V]`` (student, teacher), ``nll [B, L]`` the student's per-token
    cross-entropy with the labels (0 at padding), ``mask bool[B, L]`` the real targets.
    """
    t = jnp.float32(temperature)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, L]
    tokens = jnp.maximum(mask.sum(), 1)
    kl = jnp.where(mask, kl, 0.0).sum() / tokens
    ce = nll.sum() / tokens
    return alpha * ce + (1.0 - alpha) * t**2 * kl, {"kd_kl": kl}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained model as an argument of the student's train step (``train(teacher=...)``).

    ``params`` are traced (the step's fourth argument); the structure and alpha, T are static.
    """

    params: Any
    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    temperature: float = dataclasses.field(metadata=dict(static=True))

    def logits(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The teacher's float32 logits ``[B, Lt, V]`` on ``batch``, in evaluation mode."""
        model = nnx.merge(self.graphdef, self.params)
        logits, _ = model(
            batch["src"], batch["tgt_in"], batch.get("task"), train=False, segments=segments(batch)
        )  # packed rows too: the same segments as the student
        return jax.lax.stop_gradient(logits)

    def objective(self, batch, logits, nll, mask):
        """The hook ``moe.training.step.loss_and_metrics`` calls: ``(loss term, metrics)``."""
        return kd_objective(
            logits, self.logits(batch), nll, mask, alpha=self.alpha, temperature=self.temperature
        )


def check_student(teacher: cfg.Experiment, student: cfg.Experiment) -> None:
    """One line naming the first thing a student may not change (module docstring)."""
    t, s = teacher.model_dump(mode="json"), student.model_dump(mode="json")
    differs = [k for k in _SHARED if t[k] != s[k]]
    differs += [f"model.{k}" for k in _MODEL if t["model"][k] != s["model"][k]]
    if teacher.mesh_shape != student.mesh_shape:
        differs.append("pod.mesh")
    if student.model.weight_bits:
        raise UserError("the student cannot be a quantised model (model.weight_bits)")
    if differs:
        raise UserError(
            f"the student config changes the teacher's {differs[0]}; a student keeps the "
            "teacher's tasks, data, vocabulary, lengths and mesh (extends: its config.yaml)"
        )


def _init_from_teacher(student: cfg.Experiment, out: Path, teacher_params: Any) -> int:
    """Write ``out``'s step-0 checkpoint: the student's init with every parameter the teacher
    has at the same path and shape replaced by the teacher's; returns how many were taken."""
    if jax.process_count() > 1:
        raise UserError("--init-from-teacher runs in one process; add pod.processes=1")
    params = nnx.split(build.build_model(student), nnx.Param)[1]
    theirs = dict(nnx.to_flat_state(teacher_params))
    taken, flat = 0, []
    for path, var in nnx.to_flat_state(params):
        mine, other = var[...], theirs[path][...] if path in theirs else None
        same = other is not None and (other.shape, other.dtype) == (mine.shape, mine.dtype)
        taken += same
        flat.append((path, var.replace(jax.device_get(other if same else mine))))
    surgery.write_run(student, out, nnx.from_flat_state(flat), 0, {"init_from": "teacher"})
    return taken


def distill(
    teacher_dir: Path,
    student: cfg.Experiment,
    out: Path,
    *,
    alpha: float = 0.75,
    temperature: float = 1.0,
    step: int | None = None,
    init_from_teacher: bool = False,
    progress: bool = False,
    say: Callable[..., None] = lambda *a, **k: None,
) -> rf.TrainSummary:
    """Train ``student`` (renamed ``out.name``) in ``out`` distilled from the run
    ``teacher_dir`` (module docstring); a second call with the same arguments resumes it."""
    teacher_dir, out = Path(teacher_dir), Path(out)
    student = student.model_copy(update={"name": out.name})  # the run is named by its directory
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise UserError(f"--alpha {alpha} must be in [0, 1] and --temperature {temperature} > 0")
    before, problem = rf.read_json(out / INFO, rf.DistillInfo)
    if step is None and not problem:
        step = before.teacher_step  # resume against the teacher it started with
    restored = restore(teacher_dir, step)
    check_student(restored.exp, student)
    summary, _ = rf.read_json(teacher_dir / "eval" / "summary.json", rf.EvalSummary)
    info = rf.DistillInfo(
        teacher=str(teacher_dir.resolve()),
        teacher_step=restored.step,
        alpha=alpha,
        temperature=temperature,
        init_from_teacher=init_from_teacher,
        teacher_tasks={
            n: rf.EvalMetrics(loss=t.loss, perplexity=t.perplexity, bleu=t.bleu)
            for n, t in summary.tasks.items()
        },
    )
    if not problem and before.model_dump(exclude={"teacher_tasks"}) != info.model_dump(
        exclude={"teacher_tasks"}
    ):
        raise UserError(
            f"{out} was distilled from {before.teacher} (step {before.teacher_step}, alpha "
            f"{before.alpha}, T {before.temperature}); resume with those or choose another --out"
        )
    ckpt = Checkpointer(out / "checkpoints", keep=student.checkpoint.keep)
    resuming = ckpt.latest_step() is not None
    ckpt.close()
    if init_from_teacher and not resuming:
        taken = _init_from_teacher(student, out, restored.params)
        say(f"moe: student starts from {taken} of the teacher's parameters")
    if jax.process_index() == 0:
        rf.write_json(out / INFO, info)
    teacher = Teacher(restored.params, restored.placement.graphdef, alpha, temperature)
    return train(student, out, progress=progress, teacher=teacher)
