"""Mixture probabilities (papers.md §9), batcher determinism and process slicing, eval batches,
packing several examples into a row."""

from __future__ import annotations

import numpy as np
import pytest

from moe.data.packing import BATCH_KEYS
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


def _batcher(tasks=None, batch_size=8, temperature=5.0, seed=0, pack=False, widths=(5, 7)):
    tasks = _tasks() if tasks is None else tasks
    return Batcher(
        tasks,
        batch_size=batch_size,
        max_src_len=widths[0],
        max_tgt_len=widths[1],
        seed=seed,
        temperature=temperature,
        pack=pack,
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
    draws = np.concatenate([batcher.plan(step).task for step in range(200)])  # 51,200 rows
    expected = mixture_probabilities(SIZES, temperature) * draws.size
    observed = np.bincount(draws, minlength=3)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, p = 0.001


def test_sampled_rows_cover_each_train_split_uniformly():
    batcher = _batcher(tasks=_tasks(sizes=(10, 10, 10)), batch_size=300)
    plan = batcher.plan(0)
    task_ids, rows = plan.task, plan.row
    for t in range(3):
        counts = np.bincount(rows[task_ids == t], minlength=10)
        assert counts.size == 10 and counts.min() > 0


def test_same_step_gives_the_same_batch_in_a_fresh_batcher():
    a, b = _batcher().global_batch(17), _batcher().global_batch(17)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    other = _batcher().global_batch(18)
    assert not np.array_equal(a["tgt_out"], other["tgt_out"])
    reseeded = _batcher(seed=1).global_batch(17)
    assert not np.array_equal(a["tgt_out"], reseeded["tgt_out"])


def test_batch_layout_tags_shift_and_dtypes():
    batcher = _batcher(batch_size=64)
    batch = batcher.global_batch(3)
    plan = batcher.plan(3)
    task_ids, rows = plan.task, plan.row
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        k: (np.int32, (64, 5 if k.startswith("src") else 7)) for k in BATCH_KEYS
    }
    for r in range(64):
        t, i = task_ids[r], rows[r]
        ids = 100 * t + i % 90 + 10
        expect_src = [6, 0, 0, 0, 0] if t == 2 else [4 + t, ids, EOS_ID, 0, 0]
        assert batch["src"][r].tolist() == expect_src
        assert batch["tgt_out"][r].tolist() == [ids, ids + 1, EOS_ID, 0, 0, 0, 0]
        assert batch["tgt_in"][r].tolist() == [BOS_ID, ids, ids + 1, 0, 0, 0, 0]  # within it
    np.testing.assert_array_equal(batch["tgt_task"][:, 0], task_ids)
    np.testing.assert_array_equal(batch["tgt_segment"], (batch["tgt_out"] != 0).astype(int))
    assert batch["tgt_position"][0].tolist() == [0, 1, 2, 0, 0, 0, 0]


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
    plan = batcher.plan(9)
    task_ids, rows = plan.task, plan.row
    batcher.process_batch(9, 1, 4)  # rows 4..7 of the global batch
    for t, task in enumerate(tasks):
        mine = rows[4:8][task_ids[4:8] == t]
        assert sorted(task.splits["train"].read) == sorted(mine.tolist())


def test_process_batch_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _batcher(batch_size=8).process_batch(0, 0, 3)


def test_eval_batches_cover_a_split_in_order_with_empty_rows_at_the_end():
    batcher = _batcher()
    batches = list(batcher.eval_batches("t0", "valid", 3))
    assert len(batches) == 3  # 7 rows -> 3 + 3 + 1 (and two empty rows)
    mask = np.concatenate([b["tgt_segment"][:, 0] > 0 for b in batches])
    assert mask.tolist() == [True] * 7 + [False] * 2
    seen = np.concatenate([b["tgt_out"][:, 0] for b in batches])[mask]
    assert seen.tolist() == [10 + i for i in range(7)]
    assert not np.concatenate([b["tgt_out"] for b in batches])[~mask].any()  # no loss there
    assert all(b["src"].shape == (3, 5) and (b["src_task"][:, 0] == 0).all() for b in batches)
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


def _examples_of(batch):
    """{(task, tgt tokens)} of every example of a batch, read back through its segments."""
    out = []
    for r in range(batch["tgt_out"].shape[0]):
        for k in range(1, batch["tgt_segment"][r].max() + 1):
            at = batch["tgt_segment"][r] == k
            out.append((int(batch["tgt_task"][r][at][0]), tuple(batch["tgt_out"][r][at])))
    return sorted(out)


def test_packed_rows_hold_several_whole_examples_apart():
    batcher = _batcher(batch_size=4, pack=True, widths=(12, 14))
    plan = batcher.plan(2)
    batch = batcher.global_batch(2)
    assert len(plan.task) > 4  # several examples a row
    for r in range(4):
        for side in ("src", "tgt"):
            seg = batch[f"{side}_segment"][r]
            n = int(seg.max())
            assert sorted(np.unique(seg[seg > 0]).tolist()) == list(range(1, n + 1))
            for k in range(1, n + 1):  # contiguous, positions restart, one task
                at = np.flatnonzero(seg == k)
                assert (np.diff(at) == 1).all()
                assert batch[f"{side}_position"][r][at].tolist() == list(range(len(at)))
                assert len(set(batch[f"{side}_task"][r][at].tolist())) == 1
    # tgt_in is bos + the target shifted right within each example
    tin, tout, seg = batch["tgt_in"], batch["tgt_out"], batch["tgt_segment"]
    starts = (seg > 0) & (batch["tgt_position"] == 0)
    assert (tin[starts] == BOS_ID).all()
    inner = (seg > 0) & ~starts
    assert (tin[:, 1:][inner[:, 1:]] == tout[:, :-1][inner[:, 1:]]).all()
    real = (tout != 0).sum()
    assert real == plan.tgt_len.sum() and real > 0.8 * tout.size  # nearly no padding
    expected = sorted(
        (int(t), tuple(int(x) for x in [100 * t + r % 90 + 10, 100 * t + r % 90 + 11, EOS_ID]))
        for t, r in zip(plan.task, plan.row)
    )
    assert _examples_of(batch) == expected


@pytest.mark.parametrize("process_count", [2, 4])
def test_packed_process_batches_concatenate_to_the_global_batch(process_count):
    expected = _batcher(batch_size=8, pack=True, widths=(12, 14)).global_batch(4)
    parts = [
        _batcher(batch_size=8, pack=True, widths=(12, 14)).process_batch(4, i, process_count)
        for i in range(process_count)
    ]
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_packed_eval_batches_hold_every_example_once_in_order():
    batcher = _batcher(pack=True, widths=(12, 14))
    batches = list(batcher.eval_batches("t0", "valid", 2))
    got = [t for b in batches for t in _examples_of(b)]
    assert sorted(got) == sorted((0, (10 + i, 11 + i, EOS_ID)) for i in range(7))
    assert len(batches) < 4  # unpacked: 4 batches of 2 rows
