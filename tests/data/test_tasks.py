"""Mixture probabilities (papers.md §9), batcher determinism and process slicing, eval batches."""

from __future__ import annotations

import numpy as np
import pytest

from moe.data.tasks import Batcher, Task, mixture_probabilities
from moe.data.token_store import ArrayRows
from moe.data.vocab import BOS_ID, EOS_ID

SIZES = (1000, 100, 10)


class SpyRows(ArrayRows):
    """ArrayRows that records which rows were read."""

    def __init__(self, src, tgt):
        super().__init__(src, tgt)
        self.read: list[int] = []

    def read_rows(self, indices):
        self.read.extend(np.asarray(indices).tolist())
        return super().read_rows(indices)


def _rows(n: int, tag: int, task: int, src_width: int, tgt_width: int = 6) -> SpyRows:
    """Row i: src = [tag, 100*task + i % 90 + 10, eos] (or [tag] for width 1), tgt = [..., eos]."""
    ids = 100 * task + np.arange(n) % 90 + 10
    src = np.zeros((n, src_width), np.int32)
    src[:, 0] = tag
    if src_width > 1:
        src[:, 1], src[:, 2] = ids, EOS_ID
    tgt = np.zeros((n, tgt_width), np.int32)
    tgt[:, 0], tgt[:, 1], tgt[:, 2] = ids, ids + 1, EOS_ID
    return SpyRows(src, tgt)


def _tasks(sizes=SIZES, weights=(1.0, 1.0, 1.0)) -> list[Task]:
    kinds = ("translate", "translate", "lm")
    tags = (4, 5, 6)
    return [
        Task(
            name=f"t{i}",
            kind=kinds[i],
            tag=f"<t{i}>",
            tag_id=tags[i],
            splits={
                "train": _rows(n, tags[i], i, 1 if kinds[i] == "lm" else 4),
                "valid": _rows(7, tags[i], i, 1 if kinds[i] == "lm" else 4),
            },
            weight=weights[i],
        )
        for i, n in enumerate(sizes)
    ]


def _batcher(tasks=None, batch_size=8, temperature=5.0, seed=0) -> Batcher:
    tasks = _tasks() if tasks is None else tasks
    return Batcher(
        tasks,
        batch_size=batch_size,
        max_src_len=5,
        max_tgt_len=7,
        seed=seed,
        temperature=temperature,
    )


def _reference_q(sizes, temperature, weights):
    p = [n / sum(sizes) for n in sizes]
    raw = [(w * pi) ** (1.0 / temperature) for w, pi in zip(weights, p)]
    return [r / sum(raw) for r in raw]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 100.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_mixture_probabilities_follow_the_tempered_formula(temperature, weights):
    q = mixture_probabilities(SIZES, temperature, weights)
    np.testing.assert_allclose(q, _reference_q(SIZES, temperature, weights), rtol=1e-12)


def test_mixture_limits_proportional_uniform_and_zero_weight():
    np.testing.assert_allclose(mixture_probabilities(SIZES, 1.0), np.array(SIZES) / sum(SIZES))
    np.testing.assert_allclose(mixture_probabilities(SIZES, float("inf")), [1 / 3] * 3)
    np.testing.assert_allclose(mixture_probabilities(SIZES, 1e6), [1 / 3] * 3, atol=1e-5)
    q = mixture_probabilities(SIZES, 5.0, weights=(1.0, 0.0, 1.0))
    assert q[1] == 0.0 and q.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(mixture_probabilities(SIZES, float("inf"), (1, 0, 1)), [0.5, 0, 0.5])


@pytest.mark.parametrize(
    "sizes, temperature, weights",
    [((10, 0), 5.0, None), ((10, 5), 0.0, None), ((10, 5), 5.0, (0.0, 0.0)), ((), 5.0, None)],
)
def test_mixture_rejects_bad_inputs(sizes, temperature, weights):
    with pytest.raises(ValueError):
        mixture_probabilities(sizes, temperature, weights)


@pytest.mark.parametrize("temperature", [1.0, 5.0, 1000.0])
def test_sampled_task_frequencies_match_the_mixture(temperature):
    batcher = _batcher(batch_size=256, temperature=temperature)
    draws = np.concatenate([batcher.plan(step)[0] for step in range(200)])  # 51,200 rows
    expected = mixture_probabilities(SIZES, temperature) * draws.size
    observed = np.bincount(draws, minlength=3)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, p = 0.001


def test_sampled_rows_cover_each_train_split_uniformly():
    batcher = _batcher(tasks=_tasks(sizes=(10, 10, 10)), batch_size=300)
    task_ids, rows = batcher.plan(0)
    for t in range(3):
        counts = np.bincount(rows[task_ids == t], minlength=10)
        assert counts.size == 10 and counts.min() > 0


def test_same_step_gives_the_same_batch_in_a_fresh_batcher():
    a, b = _batcher().global_batch(17), _batcher().global_batch(17)
    for key in ("src", "tgt_in", "tgt_out", "task"):
        np.testing.assert_array_equal(a[key], b[key])
    other = _batcher().global_batch(18)
    assert not np.array_equal(a["tgt_out"], other["tgt_out"])
    reseeded = _batcher(seed=1).global_batch(17)
    assert not np.array_equal(a["tgt_out"], reseeded["tgt_out"])


def test_batch_layout_tags_shift_and_dtypes():
    batcher = _batcher(batch_size=64)
    batch = batcher.global_batch(3)
    task_ids, rows = batcher.plan(3)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "src": (np.int32, (64, 5)),
        "tgt_in": (np.int32, (64, 7)),
        "tgt_out": (np.int32, (64, 7)),
        "task": (np.int32, (64,)),
    }
    for r in range(64):
        t, i = task_ids[r], rows[r]
        ids = 100 * t + i % 90 + 10
        expect_src = [6, 0, 0, 0, 0] if t == 2 else [4 + t, ids, EOS_ID, 0, 0]
        assert batch["src"][r].tolist() == expect_src
        assert batch["tgt_out"][r].tolist() == [ids, ids + 1, EOS_ID, 0, 0, 0, 0]
        assert batch["tgt_in"][r].tolist() == [BOS_ID, ids, ids + 1, EOS_ID, 0, 0, 0]
    np.testing.assert_array_equal(batch["task"], task_ids)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_batches_concatenate_to_the_global_batch(process_count):
    step = 5
    expected = _batcher(batch_size=16).global_batch(step)
    parts = [
        _batcher(batch_size=16).process_batch(step, i, process_count) for i in range(process_count)
    ]
    for key, value in expected.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


def test_process_batch_reads_only_its_own_rows():
    tasks = _tasks()
    batcher = _batcher(tasks=tasks, batch_size=16)
    task_ids, rows = batcher.plan(9)
    batcher.process_batch(9, 1, 4)  # rows 4..7 of the global batch
    for t, task in enumerate(tasks):
        mine = rows[4:8][task_ids[4:8] == t]
        assert sorted(task.splits["train"].read) == sorted(mine.tolist())


def test_process_batch_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _batcher(batch_size=8).process_batch(0, 0, 3)


def test_eval_batches_cover_a_split_in_order_with_a_padding_mask():
    batcher = _batcher()
    batches = list(batcher.eval_batches("t0", "valid", 3))
    assert len(batches) == 3  # 7 rows -> 3 + 3 + 1 (padded)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [True] * 7 + [False] * 2
    seen = np.concatenate([b["tgt_out"][:, 0] for b in batches])[mask]
    assert seen.tolist() == [10 + i for i in range(7)]
    assert all(b["src"].shape == (3, 5) and (b["task"] == 0).all() for b in batches)
    assert list(batcher.eval_batches(1, "test", 3)) == []  # task 1 has no test split


def test_eval_batches_split_each_batch_across_processes():
    full = list(_batcher().eval_batches("t2", "valid", 4))
    parts = [
        list(_batcher().eval_batches("t2", "valid", 4, process_index=i, process_count=2))
        for i in range(2)
    ]
    for j, batch in enumerate(full):
        for key in batch:
            joined = np.concatenate([parts[0][j][key], parts[1][j][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_batcher_rejects_rows_wider_than_the_batch():
    with pytest.raises(ValueError, match="wider|more than the batch widths"):
        Batcher(_tasks(), batch_size=4, max_src_len=3, max_tgt_len=7, seed=0)
