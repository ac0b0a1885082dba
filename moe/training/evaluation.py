"""Evaluating a model on every task of an experiment: perplexity, decoding + BLEU and chrF,
expert usage.

An :class:`Evaluator` holds what every evaluation of a run shares (the experiment, its data and
its placement, with the jitted programs); ``perplexities`` is the quick held-out check run
during training, ``full`` the final evaluation that writes ``eval/<task>.hyp.txt``/``.ref.txt``
and ``eval/summary.json`` (a ``moe.runfiles.EvalSummary``, the report's input), and
``eval/routing_stats.json`` (``RoutingStats``: which experts the same tokens use together, for
``moe place``). Every process runs the same jitted programs on its rows of each batch.

The evaluation program is the model with ``MoeSpec.routing_stats`` on (same parameters, a
graphdef of its own): its MoE blocks add the co-activation counts of
``moe.routing.coactivation`` to their stats, so the train step never computes them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from moe import runfiles as rf
from moe.config import Experiment
from moe.data.pipeline import RunData
from moe.data.vocab import BOS_ID, EOS_ID
from moe.eval import bleu, decoding
from moe.layers.router import RouterBias
from moe.parallel.expert_parallel import token_groups
from moe.training import build
from moe.training.sharding import Placement
from moe.training.step import LossWeights, eval_step

Usage = dict[str, dict[str, list[float]]]  # {layer: {task: load [E]}}
COUNTS = ("coactivation", "first_coactivation", "transition", "routed_tokens")


class RoutingTotals:
    """Sums over evaluation batches of the co-activation stats, per task and MoE layer."""

    def __init__(self):
        self.sums: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.batches: dict[tuple[str, str], int] = {}

    def add(self, task: str, moe_stats: dict[str, dict[str, Any]]) -> None:
        for layer, stats in moe_stats.items():
            if "coactivation" not in stats:
                continue
            sums = self.sums.setdefault((task, layer), {})
            for name in COUNTS:
                if name in stats:
                    value = np.asarray(stats[name], np.float64)
                    sums[name] = sums.get(name, 0.0) + value
            self.batches[(task, layer)] = self.batches.get((task, layer), 0) + 1

    def summary(self, exp: Experiment, step: int, split: str, groups: int) -> rf.RoutingStats:
        """Means per batch (and per routing group, as the blocks report them)."""
        previous: dict[str, str | None] = {}
        last: dict[str, str] = {}
        for layer in exp.moe_layers:
            stack = layer.split("/")[0]
            previous[layer] = last.get(stack)
            last[stack] = layer
        tasks: dict[str, dict[str, rf.LayerRouting]] = {}
        for (task, layer), sums in self.sums.items():
            n = self.batches[(task, layer)]
            mean = {k: v / n for k, v in sums.items()}
            tasks.setdefault(task, {})[layer] = rf.LayerRouting(
                batches=n,
                routed_tokens=float(mean["routed_tokens"]),
                coactivation=mean["coactivation"].tolist(),
                first_coactivation=mean["first_coactivation"].tolist(),
                previous=previous[layer] if "transition" in mean else None,
                transition=mean["transition"].tolist() if "transition" in mean else None,
            )
        return rf.RoutingStats(
            step=step, split=split, groups=groups, batch_size=exp.eval.batch_size, tasks=tasks
        )


def _rows(host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch's rows."""
    n, p = jax.process_count(), jax.process_index()
    per = next(iter(host.values())).shape[0] // n
    return {k: v[p * per : (p + 1) * per] for k, v in host.items()}


class Evaluator:
    """Evaluation of one run's model (any parameters of its structure) on its tasks."""

    def __init__(self, exp: Experiment, data: RunData | None, placement: Placement):
        self.exp, self.data, self.placement = exp, data, placement
        self._stats_graphdef = None

    def _program(self, kind: str, make: Callable[[], Callable]) -> Callable:
        key = (kind, self.placement.graphdef)
        if key not in self.placement.programs:
            self.placement.programs[key] = self.placement.jit(make())
        return self.placement.programs[key]

    def eval_step(self) -> Callable:
        """``fn(params, batch) -> metrics`` (``moe.training.step.eval_step``), jitted once."""
        exp = self.exp
        weights = LossWeights(aux=exp.moe.aux_loss_weight, z=exp.moe.z_loss_weight)
        if self._stats_graphdef is None:  # the same model with routing stats (module doc)
            model = nnx.eval_shape(lambda: build.build_model(exp, routing_stats=True))
            self._stats_graphdef = nnx.split(model, nnx.Param, RouterBias)[0]
        return self._program(
            "eval",
            lambda: functools.partial(
                eval_step,
                graphdef=self._stats_graphdef,
                weights=weights,
                num_tasks=len(self.data.tasks),
            ),
        )

    def metrics(self, params: Any, host: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host metrics of one global batch (this process feeds its rows)."""
        return jax.device_get(self.eval_step()(params, self.placement.batch(_rows(host))))

    def evaluated_tasks(self) -> list[tuple[int, Any]]:
        """``(index, task)`` of the tasks evaluated (``Experiment.evaluated_tasks``)."""
        return [(i, self.data.tasks[i]) for i in self.exp.evaluated_tasks()]

    def perplexities(
        self,
        params: Any,
        split: str,
        max_batches: int | None = None,
        routing: RoutingTotals | None = None,
    ) -> tuple[dict[str, rf.TaskEval], Usage]:
        """Per task, loss and perplexity over up to ``max_batches`` (default ``eval.batches``)
        batches of its ``split``; and per layer, each task's expert usage. ``routing``, if
        given, collects the batches' co-activation counts."""
        exp = self.exp
        limit = exp.eval.batches if max_batches is None else max_batches
        out: dict[str, rf.TaskEval] = {}
        usage: Usage = {}
        for ti, task in self.evaluated_tasks():
            nll = tokens = 0.0
            loads: dict[str, list[np.ndarray]] = {}
            for host in self.data.eval_batches(ti, split, exp.eval.batch_size, limit):
                m = self.metrics(params, host)
                if routing is not None:
                    routing.add(task.name, m["moe"])
                nll += float(m["task_nll"][ti])
                tokens += float(m["task_tokens"][ti])
                for layer, stats in m["moe"].items():
                    if "expert_load" in stats:
                        loads.setdefault(layer, []).append(np.asarray(stats["expert_load"]))
            loss = nll / tokens if tokens else None
            out[task.name] = rf.TaskEval(
                kind=task.kind,
                loss=loss,
                perplexity=math.exp(min(loss, 50.0)) if loss is not None else None,
                tokens=tokens,
            )
            for layer, rows in loads.items():
                usage.setdefault(layer, {})[task.name] = np.mean(rows, axis=0).tolist()
        return out, usage

    def _decoder(self, prefixed: bool = False) -> Callable:
        """``fn(params, src, task[, prefix]) -> ids``, jitted once per kind; ``prefix`` (in
        the encoding, so beam search repeats it per beam) pins each row's first tokens."""
        ev, graphdef = self.exp.eval, self.placement.graphdef

        def run(params, src, task, prefix=None):
            model = nnx.merge(graphdef, params)

            def encode_fn(s):
                t = jnp.broadcast_to(task, s.shape[:1])
                enc, valid, _ = model.encode(s, t)
                return (enc, valid, t) if prefix is None else (enc, valid, t, prefix)

            def decode_fn(enc, tgt):
                logits = model.decode(tgt, enc[0], enc[1], enc[2])[0]
                return logits if prefix is None else decoding.force_prefix(logits, enc[3])

            common = dict(
                max_len=ev.max_decode_length,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                no_repeat_ngram=ev.no_repeat_ngram,
            )
            if ev.beam_size > 1:
                return decoding.beam_search(
                    encode_fn, decode_fn, src, beam_size=ev.beam_size,
                    length_penalty=ev.length_penalty, **common,
                )  # fmt: skip
            return decoding.greedy_decode(encode_fn, decode_fn, src, **common)

        return self._program("decode_prefix" if prefixed else "decode", lambda: run)

    def decode_ids(
        self, params: Any, src: np.ndarray, ti: int, prefix: np.ndarray | None = None
    ) -> np.ndarray:
        """Decoded ids ``int32[N, eval.max_decode_length]`` of sources ``src int32[N, Ls]`` as
        task ``ti``, ``eval.batch_size`` rows a call (the last call padded: each device's rows
        are one routing group). ``prefix int32[N, P]`` (0-padded on the right) makes row n
        start with its tokens (``decoding.force_prefix``: an lm task continues a text).
        Needs no data: callers may build the Evaluator with ``data=None`` to decode only."""
        fn = self._decoder(prefixed=prefix is not None)
        bs = self.exp.eval.batch_size
        out = []
        for start in range(0, len(src), bs):
            host = {"src": src[start : start + bs]}
            if prefix is not None:
                host["prefix"] = prefix[start : start + bs]
            n = len(host["src"])
            host = {k: np.pad(v, ((0, bs - n), (0, 0))) for k, v in host.items()}
            batch = self.placement.batch(_rows(host))
            extra = [batch["prefix"]] if prefix is not None else []
            ids = fn(params, batch["src"], jnp.int32(ti), *extra)
            out.append(np.asarray(multihost_utils.process_allgather(ids, tiled=True))[:n])
        width = self.exp.eval.max_decode_length
        return np.concatenate(out) if out else np.zeros((0, width), np.int32)

    def decode_task(self, params: Any, ti: int, split: str):
        """Decode up to ``eval.bleu_examples`` examples of task ``ti`` (a random sample of the
        split, seeded by ``eval.sample_seed``): (sources, refs, hyps)."""
        ev = self.exp.eval
        sources, refs, src_tokens = self.data.references(
            ti, split, ev.bleu_examples, seed=ev.sample_seed
        )
        if not refs:
            return [], [], []
        ids = self.decode_ids(params, src_tokens, ti)
        return sources, refs, [self.data.vocab.decode(row.tolist()) for row in ids]

    def full(self, run_dir: Path, params: Any, split: str, step: int) -> rf.EvalSummary:
        """Final evaluation of every task; writes eval files and ``eval/summary.json``."""
        exp, primary = self.exp, jax.process_index() == 0
        routing = RoutingTotals()
        tasks, usage = self.perplexities(params, split, max_batches=10**9, routing=routing)
        if primary and routing.sums:
            groups = token_groups(self.placement.mesh)
            stats = routing.summary(exp, step, split, groups)
            rf.write_json(run_dir / "eval" / "routing_stats.json", stats)
        for ti, task in self.evaluated_tasks():
            row = tasks[task.name]
            if task.kind != "translate" or not exp.eval.bleu_examples:
                continue
            sources, refs, hyps = self.decode_task(params, ti, split)
            if not refs:
                continue
            spec = exp.tasks[ti]
            tokenize = bleu.tokenizer_for(bleu.target_language(spec.source), spec.bleu_tokenize)
            row.bleu, row.bleu_signature = bleu.corpus_bleu(hyps, refs, tokenize)
            row.chrf, row.chrf_signature = bleu.corpus_chrf(hyps, refs)
            row.decoded, row.sample_seed = len(hyps), exp.eval.sample_seed
            row.split_size = len(task.examples.get(split, []))
            row.empty_fraction, row.looping_fraction = bleu.degenerate_fractions(hyps)
            if primary:
                hyp_p, ref_p = bleu.write_decodes(run_dir, task.name, hyps, refs)
                row.hypotheses = str(hyp_p.relative_to(run_dir))
                row.references = str(ref_p.relative_to(run_dir))
            row.examples = [
                rf.DecodedExample(source=s, reference=r, hypothesis=h)
                for s, r, h in list(zip(sources, refs, hyps))[:5]
            ]
        summary = rf.EvalSummary(step=step, split=split, tasks=tasks, expert_usage=usage)
        if primary:
            rf.write_json(run_dir / "eval" / "summary.json", summary)
        return summary


def score_lines(summary: rf.EvalSummary) -> list[str]:
    """One line per task of an evaluation: its split and step, perplexity, BLEU and chrF
    (translate tasks), and a warning when its decodes are degenerate."""
    lines = []
    for name, t in summary.tasks.items():
        text = f"{name} ({summary.split}, step {summary.step}): perplexity "
        text += f"{t.perplexity:.2f}" if t.perplexity is not None else "n/a"
        if t.bleu is not None:
            text += f", BLEU {t.bleu:.2f}, chrF {t.chrf:.2f} ({t.decoded} sentences)"
        lines.append(text)
        warning = bleu.degenerate_warning(name, t.empty_fraction, t.looping_fraction)
        if warning:
            lines.append(f"warning: {warning}")
    return lines
