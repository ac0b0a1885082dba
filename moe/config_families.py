"""Task families of the experiment schema: one ``tasks:`` entry ``{family: gettext, ...}`` that
stands for one task per language and direction, expanded before validation (the experiment's
``tasks`` then holds the named tasks, which ``moe config show`` lists and runs save)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from moe import catalogues
from moe.config_sections import DataConfig, Section

Direction = Literal["en-x", "x-en"]


class TaskFamily(Section):
    """One entry of ``tasks:`` that stands for many: every gettext language under
    ``data.locale_dir`` with at least ``min_pairs`` usable pairs (``moe.catalogues``), in each
    direction; ``expand_families`` replaces it by named tasks ``en-xx`` / ``xx-en``."""

    family: Literal["gettext"] = Field(description="gettext: the system's message catalogues.")
    directions: list[Direction] = Field(
        default_factory=lambda: ["en-x"], min_length=1, description="en-x and/or x-en."
    )
    min_pairs: int = Field(
        1000, ge=1, description="Usable pairs (distinct, within data.max_chars) a language needs."
    )
    languages: list[str] | None = Field(
        None, description="Only these languages (each must have min_pairs); None = all."
    )
    exclude: list[str] = Field(default_factory=list, description="Languages left out.")
    max_languages: int | None = Field(
        None, gt=0, description="Keep only the N languages with most pairs."
    )
    weight: float = Field(1.0, ge=0.0, description="Mixture weight of every expanded task.")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Per-task weight overrides by expanded name ('en-de')."
    )
    max_examples: int | None = Field(None, gt=0, description="Cap on each task's train split.")


def _family_error(i: int, err: Exception) -> ValueError:
    first = err.errors()[0] if hasattr(err, "errors") else None
    if first is None:
        return ValueError(f"tasks.{i}: {err}")
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return ValueError(f"tasks.{i}{'.' + loc if loc else ''}: {msg}")


def expand_families(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (an experiment before validation) with every ``{family: ...}`` entry of
    ``tasks`` replaced by its named tasks, in language order per direction; the pairs are
    counted once per locale tree and cached (``moe.catalogues.count_pairs``)."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not any(isinstance(t, dict) and "family" in t for t in tasks):
        return raw
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    fields = DataConfig.model_fields
    root = data.get("locale_dir", fields["locale_dir"].default)
    max_chars = data.get("max_chars", fields["max_chars"].default)
    cache = data.get("cache_dir", fields["cache_dir"].default)
    out: list[Any] = []
    counts: dict[str, int] | None = None
    for i, entry in enumerate(tasks):
        if not (isinstance(entry, dict) and "family" in entry):
            out.append(entry)
            continue
        try:
            fam = TaskFamily.model_validate(entry)
        except ValueError as err:
            raise _family_error(i, err) from None
        if counts is None:
            if not Path(str(root)).is_dir():
                raise ValueError(f"tasks.{i}: data.locale_dir={root} is not a directory")
            counts = catalogues.count_pairs(str(root), max_chars, cache)
        out.extend(_expand(i, fam, counts))
    return {**raw, "tasks": out}


def _expand(i: int, fam: TaskFamily, counts: dict[str, int]) -> list[dict[str, Any]]:
    where = f"tasks.{i}"
    for lang in [*(fam.languages or []), *fam.exclude]:
        if lang not in counts:
            near = difflib.get_close_matches(lang, list(counts), n=1)
            hint = f"; did you mean {near[0]!r}" if near else ""
            raise ValueError(f"{where}: no gettext catalogues for language {lang!r}{hint}")
    pool = fam.languages if fam.languages is not None else sorted(counts)
    langs = [x for x in pool if x not in fam.exclude and counts[x] >= fam.min_pairs]
    short = [x for x in fam.languages or [] if counts[x] < fam.min_pairs]
    if short:
        raise ValueError(
            f"{where}.languages: {short[0]!r} has {counts[short[0]]} usable pairs, fewer than "
            f"min_pairs={fam.min_pairs}"
        )
    if fam.max_languages is not None:
        keep = set(sorted(langs, key=lambda x: (-counts[x], x))[: fam.max_languages])
        langs = [x for x in langs if x in keep]
    if not langs:
        best = max(counts.values(), default=0)
        raise ValueError(
            f"{where}.min_pairs={fam.min_pairs}: no language qualifies (the most pairs: {best})"
        )
    made = []
    for direction in fam.directions:
        for lang in sorted(langs):
            name = f"en-{lang}" if direction == "en-x" else f"{lang}-en"
            made.append(
                {
                    "name": name,
                    "kind": "translate",
                    "source": f"gettext:{lang}",
                    "weight": fam.weight,
                    "max_examples": fam.max_examples,
                    "reverse": direction == "x-en",
                    "group": f"{fam.family}/{direction}",
                }
            )
    names = [t["name"] for t in made]
    for name, w in fam.weights.items():
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {near[0]!r}" if near else ""
            raise ValueError(f"{where}.weights: {name!r} is not a task of this family{hint}")
        made[names.index(name)]["weight"] = w
    return made
