"""moe distill: the KD loss against a hand-computed example, what a student may change, and a
distilled student as an ordinary run that resumes exactly."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import config as cfg
from moe.errors import UserError
from moe.serving import distill as kd
from moe.training.checkpoint import Checkpointer
from moe.training.sharding import Placement

TEACHER = jnp.asarray([[[2.0, 0.0, 0.0], [5.0, -5.0, 1.0]]])  # [B=1, L=2, V=3]
STUDENT = jnp.asarray([[[0.0, 0.0, 0.0], [-3.0, 2.0, 0.0]]])
MASK = jnp.asarray([[True, False]])  # position 1 is padding
NLL = jnp.asarray([[0.7, 0.0]])


def test_kd_loss_matches_a_hand_computed_example():
    """T = 2, alpha = 0.25, one real token: p_T = softmax([1, 0, 0]), q_T = uniform."""
    out, metrics = kd.kd_objective(STUDENT, TEACHER, NLL, MASK, alpha=0.25, temperature=2.0)
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    kl = sum(pi * math.log(pi / (1 / 3)) for pi in p)  # = 0.1232844595...
    assert float(metrics["kd_kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(out) == pytest.approx(0.25 * 0.7 + 0.75 * 2.0**2 * kl, rel=1e-6)
    assert float(out) == pytest.approx(0.5448533785056633, rel=1e-6)


def test_the_soft_term_gradient_is_t_times_q_minus_p():
    """Hinton §2: dKL/dz = (q_T - p_T) / T, so the T^2-scaled term has gradient T (q_T - p_T)
    at real tokens and none at padding; alpha = 1 leaves the labels' CE alone."""
    t = 3.0
    soft = lambda z: kd.kd_objective(z, TEACHER, NLL, MASK, alpha=0.0, temperature=t)[0]
    grad = jax.grad(soft)(STUDENT)
    p = jax.nn.softmax(TEACHER[0, 0] / t)
    q = jax.nn.softmax(STUDENT[0, 0] / t)
    np.testing.assert_allclose(grad[0, 0], t * (q - p), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad[0, 1], 0.0)
    hard, _ = kd.kd_objective(STUDENT, TEACHER, NLL, MASK, alpha=1.0, temperature=t)
    assert float(hard) == pytest.approx(0.7)


def experiment(**changes):
    raw = {
        "name": "t",
        "model": {"d_model": 16, "num_heads": 2, "d_ff": 32, "vocab_size": 64},
        "tasks": [{"name": "a", "kind": "translate", "source": "tsv:a.tsv"}],
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    return cfg.from_dict(raw)


def test_a_student_keeps_the_teachers_tasks_vocabulary_lengths_and_mesh():
    teacher = experiment()
    kd.check_student(teacher, experiment(**{"moe.every": 0, "model.d_ff": 64}))  # dense: fine
    for change, named in [
        ({"model.vocab_size": 128}, "model.vocab_size"),
        ({"model.max_source_length": 20}, "model.max_source_length"),
        ({"data.max_chars": 50}, "data"),
        ({"pod.mesh": {"data": 1, "expert": 1}, "pod.slice": "2"}, "pod.mesh"),
    ]:
        with pytest.raises(UserError, match=named):
            kd.check_student(teacher, experiment(**change))
    other = experiment()
    other = cfg.from_dict(
        {**other.model_dump(mode="json"), "tasks": [{**other.tasks[0].model_dump(), "name": "b"}]}
    )
    with pytest.raises(UserError, match="tasks"):
        kd.check_student(teacher, other)
    with pytest.raises(UserError, match="quantised"):
        kd.check_student(teacher, experiment(**{"model.weight_bits": 8}))


def student_of(exp, steps):
    raw = exp.model_dump(mode="json")
    raw["name"] = "student"
    raw["moe"]["every"] = 0
    raw["train"]["steps"] = steps
    raw["checkpoint"]["every"] = 4
    return cfg.from_dict(raw)


def params_at(exp, run_dir, step):
    state, _ = Checkpointer(run_dir / "checkpoints", keep=5).restore(
        step, Placement.for_experiment(exp).abstract_state
    )
    return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow
def test_distilled_student_is_a_run_and_resumes_bit_identically(tiny_run, tmp_path, monkeypatch):
    exp, teacher_dir = tiny_run
    student = student_of(exp, 8)
    ref = tmp_path / "ref"
    summary = kd.distill(teacher_dir, student, ref, alpha=0.5, temperature=2.0)
    assert summary.steps == 8
    info = json.loads((ref / "distill.json").read_text())
    assert info["alpha"] == 0.5 and info["temperature"] == 2.0
    assert info["teacher_step"] == exp.train.steps and set(info["teacher_tasks"]) == {"rev", "lm"}
    assert (ref / "eval" / "summary.json").is_file() and (ref / "vocab.model").is_file()
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [2, 4, 6, 8]

    from moe.data import tasks

    original = tasks.Batcher.process_batch

    def crash_at_step_6(self, step, *args):
        if step == 6:
            raise KeyboardInterrupt  # after the step-4 checkpoint
        return original(self, step, *args)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(tasks.Batcher, "process_batch", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        kd.distill(teacher_dir, student, resumed, alpha=0.5, temperature=2.0)
    monkeypatch.setattr(tasks.Batcher, "process_batch", original)
    with pytest.raises(UserError, match="alpha 0.5"):  # the same student, another recipe
        kd.distill(teacher_dir, student, resumed, alpha=0.9, temperature=2.0)
    assert kd.distill(teacher_dir, student, resumed, alpha=0.5, temperature=2.0).resumed_from == 4
    for a, b in zip(params_at(student, resumed, 8), params_at(student, ref, 8), strict=True):
        np.testing.assert_array_equal(a, b)
