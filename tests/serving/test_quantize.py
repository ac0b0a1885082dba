"""moe quantize: an ordinary run directory with integer experts, evaluated next to its float
parent; the bytes and the quality it records."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from moe import config as cfg
from moe.report.build import build
from moe.serving import speed
from moe.serving.quantize import quantize_run
from moe.serving.translate import Translator
from moe.training.restore import restore


def test_generated_tokens_count_up_to_and_including_eos():
    ids = [[5, 6, 3, 0, 0], [7, 3, 0, 0, 0], [8, 9, 10, 11, 12], [4, 3, 6, 3, 0]]
    assert speed.generated_tokens(jnp.asarray(ids), eos_id=3).tolist() == [3, 2, 5, 2]


@pytest.mark.slow
def test_quantized_run_is_a_run_with_int8_experts_and_a_serving_section(tiny_run, tmp_path):
    exp, run_dir = tiny_run
    out = tmp_path / "tiny-int8"
    summary = quantize_run(run_dir, out, bits=8)

    qexp = cfg.load(out / "config.yaml")
    assert qexp.model.weight_bits == 8 and qexp.tasks == exp.tasks
    child = restore(out)
    bank = child.params["decoder"][1]["ffn"]["experts"]
    assert bank["w_in"][...].dtype == jnp.int8 and bank["w_in_scale"][...].shape == (4, 1, 64)
    assert child.step == summary.step == exp.train.steps

    # bytes: int8 kernels + float32 scales and biases, against all-float32 banks (2 layers)
    e, d, f = 4, 32, 64
    float_bank = 4 * (2 * e * d * f + e * (d + f))
    assert summary.float_expert_bytes == 2 * float_bank
    assert summary.expert_bytes == 2 * (2 * e * d * f + 4 * 2 * e * (d + f))
    assert summary.total_bytes < summary.float_total_bytes
    assert summary.decode_tokens_per_second > 0 and summary.float_decode_tokens_per_second > 0

    for name, task in summary.tasks.items():  # the float model evaluated by the same command
        assert abs(task.perplexity / task.float_perplexity - 1) < 0.01, name
        if task.kind == "translate":
            assert abs(task.bleu - task.float_bleu) <= 1.0, name
    float_eval = json.loads((out / "float" / "eval" / "summary.json").read_text())
    parent_eval = json.loads((run_dir / "eval" / "summary.json").read_text())
    for name, task in float_eval["tasks"].items():
        assert task["perplexity"] == pytest.approx(parent_eval["tasks"][name]["perplexity"])

    report = build(out)
    assert report.serving is not None and report.serving.bits == 8
    assert "## Serving: quantised weights" in (out / "report.md").read_text()
    outputs, _ = Translator.load(out, "rev").translate(["red cat runs"])  # translate reads it
    assert len(outputs) == 1
