"""Small data and configs of the tests' own (tests never depend on the system catalogues), and
a tiny run the way ``moe train`` makes it (train, then the report)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import yaml

WORDS = "red green blue cat dog bird runs sleeps eats big small old new one two three".split()


def write_corpus(root, n=400, seed=0):
    """A reversal 'translation' task (tsv) and an LM text file; deterministic."""
    rng = random.Random(seed)
    pairs, lines = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        pairs.append(f"{' '.join(words)}\t{' '.join(reversed(words))}")
        lines.append(" ".join(sorted(words)))
    (root / "rev.tsv").write_text("\n".join(pairs) + "\n")
    (root / "lm.txt").write_text("\n".join(lines) + "\n")
    return root / "rev.tsv", root / "lm.txt"


_MO_HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


def write_mo(path: Path, entries: dict[str, str]) -> Path:
    """A minimal GNU .mo file: plural msgids are "one\\0many", contexts "ctx\\x04msgid"."""
    entries = {"": _MO_HEADER, **entries}
    keys = sorted(entries, key=lambda k: k.encode())
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    table_o, table_t = 28, 28 + 8 * n
    offset = 28 + 16 * n
    orig, trans, blob = [], [], b""
    for group, table in ((ids, orig), (strs, trans)):
        for s in group:
            table.append((len(s), offset + len(blob)))
            blob += s + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, table_o, table_t, 0, 0)
    out += b"".join(struct.pack("<2I", *e) for e in orig + trans) + blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out)
    return path


def fake_locale(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A locale tree of made-up languages: ``sizes[lang]`` English phrases each, translated
    by a fixed word substitution per language (so the languages differ), in two catalogues."""
    rng = random.Random(seed)
    phrases = sorted(
        {" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(400)}
    )
    for li, (lang, n) in enumerate(sorted(sizes.items())):
        table = {w: f"{w[::-1]}{'aeiou'[li % 5]}{li}" for w in WORDS}
        entries = {p: " ".join(table[w] for w in p.split()) for p in phrases[:n]}
        half = sorted(entries)[: n // 2]
        write_mo(root / lang / "LC_MESSAGES/a.mo", {k: entries[k] for k in half})
        write_mo(
            root / lang / "LC_MESSAGES/b.mo", {k: v for k, v in entries.items() if k not in half}
        )
    return root


def tiny_config(root, **sections):
    tsv, txt = write_corpus(root)
    raw = {
        "name": "tiny",
        "runs_dir": str(root / "runs"),
        "model": {
            "d_model": 32,
            "num_heads": 2,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "d_ff": 64,
            "dropout": 0.0,
            "vocab_size": 64,
            "max_source_length": 10,
            "max_target_length": 10,
        },
        "moe": {"num_experts": 4, "every": 2, "top_k": 2},
        "tasks": [
            {"name": "rev", "kind": "translate", "source": f"tsv:{tsv}"},
            {"name": "lm", "kind": "lm", "source": f"text:{txt}"},
        ],
        "data": {"cache_dir": str(root / "cache"), "valid_fraction": 0.1, "test_fraction": 0.1},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "learning_rate": 0.01,
            "warmup_steps": 2,
            "log_every": 2,
        },
        "eval": {
            "every": 6,
            "batches": 1,
            "batch_size": 8,
            "bleu_examples": 8,
            "max_decode_length": 10,
        },
        "checkpoint": {"every": 4, "keep": 5},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_and_report(exp, run_dir):
    """What ``moe train`` does in one process: train and evaluate, then build the report."""
    from moe.report.build import build
    from moe.training.loop import train

    summary = train(exp, run_dir, progress=False)
    build(run_dir)
    return summary
