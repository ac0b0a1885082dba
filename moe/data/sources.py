"""Data sources -> lists of `Example(src, tgt)`.

A source is named by a spec string:

- `gettext:<lang>`  every catalogue `<locale_root>/<lang>/LC_MESSAGES/*.mo`, msgid -> msgstr.
  With no catalogues at all, the built-in fallback corpus (`fallback_corpus.py`) is used and
  `SourceStats.fallback_used` is set; the caller prints one line saying so.
- `text:<path>`     one example per line (language modelling: src = "", tgt = line).
- `parallel:<src_path>,<tgt_path>`  line-aligned files; different line counts are an error.
- `tsv:<path>`      `src<TAB>tgt` per line; other lines are malformed (counted, skipped, reported).

Task kinds: a `translate` task needs pairs; an `lm` task reads the *source* side of a paired
source (for gettext that is the English msgid), so one English sentence never lands in two splits.

Text is normalised by collapsing every run of whitespace (newlines, tabs) to one space;
placeholders and markup (`%s`, `{0}`, `<b>`) are kept as text. Examples are deduplicated by
(src, tgt), keeping the first; gettext examples are sorted so the order does not depend on the
file system. Everything the user got wrong raises `DataError` with a one-line message naming the
source and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe import catalogues
from moe.data.corpus import FALLBACK_LANGS, fallback_pairs
from moe.errors import UserError

DEFAULT_LOCALE_ROOT = "/usr/share/locale"
KINDS = ("lm", "translate")
_MAX_LOCATIONS = 3  # malformed locations kept for the report


class DataError(UserError):
    """Bad data or a bad source spec (a ValueError); one line naming the source. CLI exit 2."""


@dataclass(frozen=True)
class Example:
    src: str  # "" for language modelling
    tgt: str


@dataclass(frozen=True)
class SourceStats:
    """Counts from reading one source (for the report).

    examples: examples kept; malformed: lines/entries/catalogues skipped as unreadable;
    duplicates: repeated (src, tgt) pairs dropped; too_long: dropped by the length filter;
    malformed_at: the first few malformed locations ("file.tsv:7", "net-tools.mo").
    """

    examples: int
    malformed: int = 0
    duplicates: int = 0
    too_long: int = 0
    fallback_used: bool = False
    malformed_at: tuple[str, ...] = ()

    def summary(self, source: str) -> str:
        """One line for the log/report, e.g. `tsv:a.tsv: 120 examples, 2 malformed (a.tsv:3)`."""
        parts = [f"{self.examples} examples"]
        if self.malformed:
            parts.append(f"{self.malformed} malformed ({', '.join(self.malformed_at)})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates dropped")
        if self.too_long:
            parts.append(f"{self.too_long} too long dropped")
        if self.fallback_used:
            parts.append("built-in fallback corpus (no system catalogues)")
        return f"{source}: " + ", ".join(parts)


normalize = catalogues.normalize  # one rule for every source


def load_source(
    spec: str,
    *,
    kind: str = "translate",
    locale_root: str | Path = DEFAULT_LOCALE_ROOT,
    max_chars: int | None = None,
) -> tuple[list[Example], SourceStats]:
    """Read one source spec into examples for a task of `kind` ("lm" | "translate").

    `max_chars` drops examples whose src or tgt is longer than that many characters (counted in
    `too_long`). Raises `DataError` for an unknown scheme, a missing file, a kind the source
    cannot serve, or a source with no usable examples.
    """
    if kind not in KINDS:
        raise DataError(f"{spec}: unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")
    scheme, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataError(
            f"{spec}: expected '<scheme>:<argument>' with scheme gettext|text|parallel|tsv"
        )
    if scheme == "gettext":
        pairs, malformed, fallback = _read_gettext(spec, arg, Path(locale_root))
    elif scheme == "text":
        if kind == "translate":
            raise DataError(f"{spec}: a text source has no translations; use it for an lm task")
        lines = (normalize(line) for line in _raw_lines(spec, arg))
        pairs, malformed, fallback = [("", t) for t in lines if t], [], False
    elif scheme == "parallel":
        pairs, malformed, fallback = (*_read_parallel(spec, arg), False)
    elif scheme == "tsv":
        pairs, malformed, fallback = (*_read_tsv(spec, arg), False)
    else:
        raise DataError(
            f"{spec}: unknown source scheme {scheme!r} (expected gettext|text|parallel|tsv)"
        )
    if kind == "lm" and scheme != "text":
        pairs = [("", src) for src, _ in pairs]
    examples, duplicates = _dedupe(pairs)
    examples, too_long = _filter_length(examples, max_chars)
    if not examples:
        why = (
            f"all {too_long} examples are longer than max_chars={max_chars}"
            if too_long
            else ("no usable examples")
        )
        raise DataError(f"{spec}: {why}")
    stats = SourceStats(
        examples=len(examples),
        malformed=len(malformed),
        duplicates=duplicates,
        too_long=too_long,
        fallback_used=fallback,
        malformed_at=tuple(malformed[:_MAX_LOCATIONS]),
    )
    return examples, stats


def check_source(spec: str, *, kind: str, locale_root: str | Path = DEFAULT_LOCALE_ROOT) -> None:
    """The cheap part of :func:`load_source`'s checks, reading no data: the scheme, the kind it
    can serve, that its files exist, that a gettext language has catalogues or a fallback. A
    launcher runs it before starting MPI ranks, so a bad source fails once, at once."""
    if kind not in KINDS:
        raise DataError(f"{spec}: unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")
    scheme, sep, arg = spec.partition(":")
    if scheme not in ("gettext", "text", "parallel", "tsv") or not sep or not arg:
        load_source(spec, kind=kind, locale_root=locale_root)  # raises its own message
    if scheme == "gettext":
        lang = arg
        if not lang or "/" in lang or lang.startswith("."):
            raise DataError(f"{spec}: {lang!r} is not a language code (e.g. gettext:de)")
        has_files = any((Path(locale_root) / lang / "LC_MESSAGES").glob("*.mo"))
        if not has_files and lang not in FALLBACK_LANGS:
            _read_gettext(spec, lang, Path(locale_root))  # raises its message
        return
    if scheme == "text" and kind == "translate":
        raise DataError(f"{spec}: a text source has no translations; use it for an lm task")
    if scheme == "parallel":
        src_path, sep, tgt_path = arg.partition(",")
        if not sep or not src_path or not tgt_path or "," in tgt_path:
            raise DataError(f"{spec}: expected parallel:<src_path>,<tgt_path>")
        paths = [src_path, tgt_path]
    else:
        paths = [arg]
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{spec}: file not found: {path}")


def _dedupe(pairs: list[tuple[str, str]]) -> tuple[list[Example], int]:
    seen: set[tuple[str, str]] = set()
    out = []
    for src, tgt in pairs:
        if (src, tgt) not in seen:
            seen.add((src, tgt))
            out.append(Example(src, tgt))
    return out, len(pairs) - len(out)


def _filter_length(examples: list[Example], max_chars: int | None) -> tuple[list[Example], int]:
    if max_chars is None:
        return examples, 0
    kept = [e for e in examples if len(e.src) <= max_chars and len(e.tgt) <= max_chars]
    return kept, len(examples) - len(kept)


def _read_gettext(
    spec: str, lang: str, root: Path
) -> tuple[list[tuple[str, str]], list[str], bool]:
    """msgid -> msgstr pairs of every catalogue of `lang`, sorted; (pairs, malformed, fallback)."""
    if not lang or "/" in lang or lang.startswith("."):
        raise DataError(f"{spec}: {lang!r} is not a language code (e.g. gettext:de)")
    files = catalogues.catalogue_files(root, lang)
    if not files:
        if lang not in FALLBACK_LANGS:
            raise DataError(
                f"{spec}: no catalogues under {root / lang / 'LC_MESSAGES'} and no built-in "
                f"fallback for {lang!r} (fallback languages: {', '.join(FALLBACK_LANGS)})"
            )
        return sorted(fallback_pairs(lang)), [], True
    pairs, malformed = catalogues.read_pairs(files)
    return pairs, malformed, False


def _read_parallel(spec: str, arg: str) -> tuple[list[tuple[str, str]], list[str]]:
    src_path, sep, tgt_path = arg.partition(",")
    if not sep or not src_path or not tgt_path or "," in tgt_path:
        raise DataError(f"{spec}: expected parallel:<src_path>,<tgt_path>")
    src_lines, tgt_lines = (_raw_lines(spec, p) for p in (src_path, tgt_path))
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{spec}: {len(src_lines)} source lines but {len(tgt_lines)} target lines "
            "(files must be line-aligned)"
        )
    pairs, malformed = [], []
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines)):
        s, t = normalize(s), normalize(t)
        if s and t:
            pairs.append((s, t))
        elif s or t:  # one side empty: misaligned or untranslated
            malformed.append(f"{Path(src_path).name}:{i + 1}")
    return pairs, malformed


def _raw_lines(spec: str, path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{spec}: file not found: {path}")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{spec}: {path} is not UTF-8 (byte {err.start})") from None


def _read_tsv(spec: str, path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Blank lines are ignored; lines without exactly one tab or with an empty side: malformed."""
    pairs, malformed = [], []
    for i, line in enumerate(_raw_lines(spec, path)):
        if not line.strip():
            continue
        fields = line.split("\t")
        src, tgt = (normalize(f) for f in fields) if len(fields) == 2 else ("", "")
        if src and tgt:
            pairs.append((src, tgt))
        else:
            malformed.append(f"{Path(path).name}:{i + 1}")
    return pairs, malformed
