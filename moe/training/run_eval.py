"""Evaluating a model on every task of an experiment: perplexity, decoding + BLEU, expert usage.

``perplexities`` is the quick held-out check run during training; ``full`` is the final
evaluation that writes ``eval/<task>.hyp.txt``/``.ref.txt`` and ``eval/summary.json`` (the
report's input). Every process runs the same jitted programs on its rows of each batch.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from moe.training import evaluate
from moe.training.step import LossWeights, eval_step
from moe.training.vocab import BOS_ID, EOS_ID


def _rows(host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch's rows."""
    n, p = jax.process_count(), jax.process_index()
    per = next(iter(host.values())).shape[0] // n
    return {k: v[p * per : (p + 1) * per] for k, v in host.items()}


def _eval_fn(exp, placement, graphdef, num_tasks):
    key = ("eval", graphdef)
    if key not in placement.programs:
        weights = LossWeights(aux=exp.moe.aux_loss_weight, z=exp.moe.z_loss_weight)
        fn = functools.partial(eval_step, graphdef=graphdef, weights=weights, num_tasks=num_tasks)
        placement.programs[key] = placement.jit(fn)
    return placement.programs[key]


def perplexities(exp, data, placement, graphdef, params, split, max_batches=None):
    """``{task: {"loss", "perplexity", "tokens"}}`` over up to ``max_batches`` (default:
    ``eval.batches``) batches of each task's ``split``; plus per-layer expert usage of each task
    under ``"_expert_usage"`` ({layer: {task: [E]}})."""
    fn = _eval_fn(exp, placement, graphdef, len(data.tasks))
    limit = exp.eval.batches if max_batches is None else max_batches
    out: dict[str, Any] = {}
    usage: dict[str, dict[str, list[float]]] = {}
    for ti, name in enumerate(data.task_names):
        nll = tokens = 0.0
        loads: dict[str, list[np.ndarray]] = {}
        for host in data.eval_batches(ti, split, exp.eval.batch_size, limit):
            m = jax.device_get(fn(params, placement.batch(_rows(host))))
            nll += float(m["task_nll"][ti])
            tokens += float(m["task_tokens"][ti])
            for layer, stats in m["moe"].items():
                if "expert_load" in stats:
                    loads.setdefault(layer, []).append(np.asarray(stats["expert_load"]))
        loss = nll / tokens if tokens else float("nan")
        out[name] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)) if tokens else None,
            "tokens": tokens,
        }
        for layer, rows in loads.items():
            usage.setdefault(layer, {})[name] = np.mean(rows, axis=0).tolist()
    out["_expert_usage"] = usage
    return out


def _decoder(exp, placement, graphdef, data):
    key = ("decode", graphdef)
    if key in placement.programs:
        return placement.programs[key]
    bos, eos = BOS_ID, EOS_ID
    ev = exp.eval

    def run(params, src, task):
        model = nnx.merge(graphdef, params)

        def encode_fn(s):
            t = jnp.broadcast_to(task, s.shape[:1])
            enc, valid, _ = model.encode(s, t)
            return enc, valid, t

        def decode_fn(enc, tgt):
            return model.decode(tgt, enc[0], enc[1], enc[2])[0]

        if ev.beam_size > 1:
            return evaluate.beam_search(
                encode_fn,
                decode_fn,
                src,
                beam_size=ev.beam_size,
                max_len=ev.max_decode_length,
                bos_id=bos,
                eos_id=eos,
                length_penalty=ev.length_penalty,
            )
        return evaluate.greedy_decode(
            encode_fn, decode_fn, src, max_len=ev.max_decode_length, bos_id=bos, eos_id=eos
        )

    placement.programs[key] = placement.jit(run)
    return placement.programs[key]


def decode_task(exp, data, placement, graphdef, params, ti, split):
    """Decode up to ``eval.bleu_examples`` examples of task ``ti``: (sources, refs, hyps)."""
    sources, refs, src_tokens = data.references(ti, split, exp.eval.bleu_examples)
    if not refs:
        return [], [], []
    fn = _decoder(exp, placement, graphdef, data)
    bs = exp.eval.batch_size
    hyps: list[str] = []
    for start in range(0, len(refs), bs):
        chunk = src_tokens[start : start + bs]
        pad = bs - chunk.shape[0]
        chunk = np.pad(chunk, ((0, pad), (0, 0)))
        src = placement.batch(_rows({"src": chunk}))["src"]
        out = fn(params, src, jnp.int32(ti))
        ids = np.asarray(multihost_utils.process_allgather(out, tiled=True))[: bs - pad]
        hyps.extend(data.vocab.decode(row.tolist()) for row in ids)
    return sources, refs, hyps


def full(exp, run_dir: Path, data, placement, graphdef, params, split, step) -> dict[str, Any]:
    """Final evaluation of every task; writes eval files and ``eval/summary.json``."""
    ppl = perplexities(exp, data, placement, graphdef, params, split, max_batches=10**9)
    usage = ppl.pop("_expert_usage")
    primary = jax.process_index() == 0
    tasks: dict[str, Any] = {}
    for ti, task in enumerate(data.tasks):
        row = {"kind": task.kind, **ppl[task.name], "bleu": None, "bleu_signature": None}
        if task.kind == "translate" and exp.eval.bleu_examples:
            sources, refs, hyps = decode_task(exp, data, placement, graphdef, params, ti, split)
            if refs:
                row["bleu"], row["bleu_signature"] = evaluate.corpus_bleu(hyps, refs)
                if primary:
                    hyp_p, ref_p = evaluate.write_decodes(run_dir, task.name, hyps, refs)
                    row["hypotheses"] = str(hyp_p.relative_to(run_dir))
                    row["references"] = str(ref_p.relative_to(run_dir))
                row["examples"] = [
                    {"source": s, "reference": r, "hypothesis": h}
                    for s, r, h in list(zip(sources, refs, hyps))[:5]
                ]
        tasks[task.name] = row
    summary = {"step": step, "split": split, "tasks": tasks, "expert_usage": usage}
    if primary:
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        path = run_dir / "eval" / "summary.json"
        path.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    return summary
