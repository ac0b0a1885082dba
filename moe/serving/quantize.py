"""``moe quantize RUN_DIR --bits 8 --out OUT``: weight-only integer experts for inference.

The quantised run is an ordinary run directory: its ``config.yaml`` is the parent's with
``model.weight_bits`` (and ``model.quantize_dense``) set, so the model it builds holds every
expert kernel as integers with one float32 scale per output channel (``moe.layers.quant``;
with ``--dense`` the attention and dense feed-forward kernels too; embeddings, layer norms,
routers and biases stay float32), and its checkpoint holds those integers (no optimizer state:
the model is for inference). ``moe eval``, ``moe translate`` and ``moe report`` read it like any
run. The training record of the weights (``metrics.jsonl``, ``train_summary.json``) and the
vocabulary are copied from the parent.

The command then evaluates the float parent (into ``OUT/float/eval/``) and the quantised model
(``OUT/eval/``) on the same split with the same code, times their decoding of the same source
batch (``moe.serving.speed``) and writes ``OUT/serving.json`` (``runfiles.ServingSummary``):
bytes of the expert banks and of all parameters, decode tokens/s, and per task the float and
quantised perplexity and BLEU. The report shows it as its serving section.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from moe import config as cfg
from moe import runfiles as rf
from moe.data.pipeline import prepare
from moe.data.vocab import EOS_ID
from moe.errors import UserError
from moe.layers import quant
from moe.pathways import surgery
from moe.serving import speed
from moe.training import build
from moe.training.evaluation import Evaluator
from moe.training.restore import restore

SCALE = "_scale"
COPIED = (rf.VOCAB_FILE, "metrics.jsonl", "train_summary.json")


def quantized_experiment(exp: cfg.Experiment, bits: int, dense: bool, name: str):
    """The parent's experiment with its weights stored at ``bits`` bits."""
    raw = exp.model_dump(mode="json")
    raw["name"] = name
    raw["model"]["weight_bits"] = bits
    raw["model"]["quantize_dense"] = dense
    return cfg.from_dict(raw, where=f"quantised config of {exp.name}")


def quantize_params(params: nnx.State, qexp: cfg.Experiment) -> nnx.State:
    """Float ``params`` in the tree of ``qexp``'s model (host arrays): each kernel the model
    stores quantised (``quant_axes`` in its metadata) becomes its integers and, next to it,
    ``<name>_scale`` (``quant.quantize``); every other leaf is copied."""
    bits = qexp.model.weight_bits
    abstract = nnx.split(nnx.eval_shape(lambda: build.build_model(qexp)), nnx.Param)[1]
    want = dict(nnx.to_flat_state(abstract))
    have = dict(nnx.to_flat_state(params))
    host = lambda var, value: var.replace(np.asarray(jax.device_get(value)))
    out = []
    for path, var in want.items():
        axes = var.get_metadata().get("quant_axes")
        if axes is not None:
            q, scale = quant.quantize(have[path][...], bits, axes)
            scale_path = (*path[:-1], f"{path[-1]}{SCALE}")
            out += [(path, host(var, q)), (scale_path, host(want[scale_path], scale))]
        elif not str(path[-1]).endswith(SCALE):
            out.append((path, host(var, have[path][...])))
    return nnx.from_flat_state(out)


def _write(run_dir: Path, qexp, qparams, step: int, out: Path) -> None:
    surgery.write_run(qexp, out, qparams, step, {"quantized_from": str(run_dir)})
    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)


def _decode_source(exp: cfg.Experiment, data, split: str) -> tuple[int, np.ndarray]:
    """(task, sources) timed: one eval batch of the first translate task (else task 0)."""
    kinds = [t.kind for t in exp.tasks]
    ti = kinds.index("translate") if "translate" in kinds else 0
    _, _, src = data.references(ti, split, exp.eval.batch_size)
    if not len(src):  # an empty split: the task tag alone
        src = np.zeros((exp.eval.batch_size, exp.model.max_source_length), np.int32)
        src[:, 0] = data.tasks[ti].tag_id
    return ti, src


def quantize_run(
    run_dir: Path,
    out: Path,
    *,
    bits: int,
    dense: bool = False,
    step: int | None = None,
    say: Callable[..., None] = lambda *a, **k: None,
) -> rf.ServingSummary:
    """Write the quantised run ``out`` of ``run_dir`` and its ``serving.json`` (module doc)."""
    run_dir, out = Path(run_dir), Path(out)
    if bits not in quant.BITS:
        raise UserError(f"--bits {bits}: choose one of {', '.join(map(str, quant.BITS))}")
    parent = restore(run_dir, step)
    exp = parent.exp
    if exp.model.weight_bits:
        raise UserError(
            f"{run_dir} is already quantised (model.weight_bits={exp.model.weight_bits})"
        )
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must be a new directory, not the run itself")
    qexp = quantized_experiment(exp, bits, dense, name=out.name)
    _write(run_dir, qexp, quantize_params(parent.params, qexp), parent.step, out)
    say(f"moe: wrote {out} ({bits}-bit {'kernels' if dense else 'experts'}); evaluating both")

    child = restore(out)
    data = prepare(exp, say=lambda *a, **k: None)
    split = exp.eval.split
    evals = {
        "float": Evaluator(exp, data, parent.placement),
        "quantized": Evaluator(child.exp, data, child.placement),
    }
    before = evals["float"].full(out / "float", parent.params, split, parent.step)
    after = evals["quantized"].full(out, child.params, split, child.step)
    ti, src = _decode_source(exp, data, split)
    rates = speed.decode_rates(
        {n: (evals[n], p) for n, p in (("float", parent.params), ("quantized", child.params))},
        src, ti, eos_id=EOS_ID,
    )  # fmt: skip
    tasks = {
        name: rf.ServingTask(
            kind=t.kind,
            float_perplexity=before.tasks[name].perplexity,
            perplexity=t.perplexity,
            float_bleu=before.tasks[name].bleu,
            bleu=t.bleu,
        )
        for name, t in after.tasks.items()
    }
    summary = rf.ServingSummary(
        parent=str(run_dir),
        step=parent.step,
        bits=bits,
        quantize_dense=dense,
        split=split,
        expert_bytes=speed.param_bytes(child.params, experts_only=True),
        float_expert_bytes=speed.param_bytes(parent.params, experts_only=True),
        total_bytes=speed.param_bytes(child.params),
        float_total_bytes=speed.param_bytes(parent.params),
        decode_task=exp.tasks[ti].name,
        decode_tokens_per_second=rates["quantized"].tokens_per_second,
        float_decode_tokens_per_second=rates["float"].tokens_per_second,
        tasks=tasks,
    )
    if jax.process_index() == 0:
        rf.write_json(out / "serving.json", summary)
    return summary


def describe(s: rf.ServingSummary, out: Path | str) -> str:
    """One line for the terminal: bytes and decode speed, float -> quantised."""
    ratio = s.expert_bytes / s.float_expert_bytes if s.float_expert_bytes else float("nan")
    return (
        f"quantized {s.parent} -> {out} ({s.bits} bits): experts {s.float_expert_bytes:,} -> "
        f"{s.expert_bytes:,} bytes ({ratio:.2f}x); decode {s.float_decode_tokens_per_second:,.0f}"
        f" -> {s.decode_tokens_per_second:,.0f} tokens/s; see {Path(out) / 'report.md'}"
    )
