"""``moe translate RUN_DIR --task NAME``: source lines in, one output line per input line.

A line is tokenised the way training tokenised examples (``moe.data.token_store
.encode_examples``, after the sources' whitespace ``normalize``):

- a ``translate`` task: source ``[tag] + ids + [eos]``, cut to ``model.max_source_length``
  (each line cut gets a note on stderr); the output is the decoded translation;
- an ``lm`` task: source ``[tag]``, and the line's ids become the first target tokens, pinned
  by ``moe.eval.decoding.force_prefix``; the model continues them and the output is the whole
  line continued (cut to leave at least one token of ``eval.max_decode_length`` to generate).

An empty line gives an empty line. Decoding is the run's own (``eval.beam_size``,
``length_penalty``, ``max_decode_length``; ``--beam`` overrides the beam) through
``Evaluator.decode_ids``: ``eval.batch_size`` rows a call, the last call padded, since the MoE
blocks route each device's rows as one group. The vocabulary is the run directory's own copy
(``vocab.model``, written by ``moe train``), so nothing is re-read; a run trained before that
copy existed rebuilds it through the data pipeline (cached: a few seconds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moe import config as cfg
from moe import runfiles as rf
from moe.data.pipeline import prepare, task_specs, task_tag
from moe.data.sources import Example, normalize
from moe.data.token_store import encode_examples
from moe.data.vocab import UNK_ID, Vocab
from moe.errors import UserError
from moe.training.evaluation import Evaluator
from moe.training.restore import restore, run_config


def task_index(exp: cfg.Experiment, name: str) -> int:
    names = [t.name for t in exp.tasks]
    if name not in names:
        raise UserError(f"no task named {name!r} (tasks: {', '.join(names)})")
    return names.index(name)


def run_vocab(run_dir: Path, exp: cfg.Experiment, say: Callable[..., None]) -> Vocab:
    """The run's vocabulary: its ``vocab.model``, else rebuilt (cached) by the pipeline."""
    path = Path(run_dir) / rf.VOCAB_FILE
    if path.is_file():
        return Vocab.load(path)
    say(f"moe: {run_dir} has no {rf.VOCAB_FILE}; rebuilding the vocabulary from its data")
    return prepare(exp, say=lambda *a, **k: None).vocab


@dataclasses.dataclass
class Translator:
    """A restored run ready to decode lines of one task."""

    evaluator: Evaluator
    params: Any
    vocab: Vocab
    task: int
    kind: str
    tag_id: int

    @classmethod
    def load(
        cls,
        run_dir: Path,
        task: str,
        *,
        step: int | None = None,
        beam: int | None = None,
        say: Callable[..., None] = lambda *a, **k: None,
    ) -> Translator:
        exp = run_config(run_dir)
        ti = task_index(exp, task)
        if beam is not None and beam < 1:
            raise UserError(f"--beam {beam} must be >= 1")
        restored = restore(run_dir, step)
        vocab = run_vocab(run_dir, exp, say)
        tag = task_tag(task_specs(exp)[ti])
        tag_id = vocab.piece_to_id(tag)
        if tag_id == UNK_ID:
            raise UserError(f"{run_dir}: the vocabulary has no task tag {tag} (a different run's?)")
        if beam is not None:  # the decoder closes over exp.eval: a fresh placement per Translator
            ev = restored.exp.eval.model_copy(update={"beam_size": beam})
            exp = restored.exp.model_copy(update={"eval": ev})
        else:
            exp = restored.exp
        evaluator = Evaluator(exp, None, restored.placement)
        return cls(evaluator, restored.params, vocab, ti, exp.tasks[ti].kind, tag_id)

    def encode(self, lines: list[str]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """``(src int32[N, Ls], prefix int32[N, P] or None, notes)`` of non-empty ``lines``."""
        m, ev = self.evaluator.exp.model, self.evaluator.exp.eval
        src = np.zeros((len(lines), m.max_source_length), np.int32)
        prefix = np.zeros((len(lines), ev.max_decode_length), np.int32)
        notes = []
        for i, line in enumerate(lines):
            lm = self.kind == "lm"
            example = Example(src="", tgt=line) if lm else Example(src=line, tgt="")
            rows = encode_examples(
                [example], self.vocab, kind=self.kind, tag_id=self.tag_id,
                max_src_len=m.max_source_length, max_tgt_len=ev.max_decode_length,
            )  # fmt: skip
            src[i, : rows.src.shape[1]] = rows.src[0]
            if lm:  # the target without its eos: the text to continue
                prefix[i, : rows.tgt_len[0] - 1] = rows.tgt[0, : rows.tgt_len[0] - 1]
            if rows.truncated:
                kept = ev.max_decode_length - 1 if lm else m.max_source_length - 2
                why = "eval.max_decode_length" if lm else "model.max_source_length"
                notes.append(
                    f"{len(self.vocab.encode(line))} tokens, kept the first {kept} ({why})"
                )
            else:
                notes.append("")
        return src, (prefix if self.kind == "lm" else None), notes

    def translate(self, lines: list[str]) -> tuple[list[str], list[str]]:
        """One output per line (empty for an empty line) and one note per line ("" = none)."""
        lines = [normalize(line) for line in lines]
        keep = [i for i, line in enumerate(lines) if line]
        outputs, notes = [""] * len(lines), [""] * len(lines)
        if not keep:
            return outputs, notes
        src, prefix, cut = self.encode([lines[i] for i in keep])
        ids = self.evaluator.decode_ids(self.params, src, self.task, prefix)
        for j, i in enumerate(keep):
            outputs[i], notes[i] = self.vocab.decode(ids[j].tolist()), cut[j]
        return outputs, notes

    def stream(self, lines: list[str], say: Callable[..., None]) -> Iterator[str]:
        """Outputs of ``lines``, ``eval.batch_size`` lines at a time (joined by newlines), with
        a note through ``say`` for each line cut short."""
        bs = self.evaluator.exp.eval.batch_size
        for start in range(0, len(lines), bs):
            outputs, notes = self.translate(lines[start : start + bs])
            for i, note in enumerate(notes):
                if note:
                    say(f"moe: line {start + i + 1}: {note}")
            yield "\n".join(outputs)
