"""Language families of the gettext languages (for per-family means and the question "do related
languages share pathways?"). Genealogical groups at the level multilingual NMT papers use
(Romance, Germanic, Slavic, ...); a language not listed is its own family."""

from __future__ import annotations

FAMILIES: dict[str, tuple[str, ...]] = {
    "Romance": ("fr", "es", "it", "pt", "ca", "gl", "ro", "oc", "ast", "an", "la", "wa"),
    "Germanic": ("de", "nl", "sv", "da", "nb", "nn", "no", "is", "af", "fy", "en", "lb"),
    "Slavic": ("ru", "uk", "be", "pl", "cs", "sk", "sl", "hr", "sr", "bg", "mk", "bs"),
    "Baltic": ("lt", "lv"),
    "Celtic": ("ga", "gd", "cy", "br"),
    "Hellenic": ("el",),
    "Uralic": ("fi", "et", "hu"),
    "Indo-Aryan": ("hi", "bn", "gu", "mr", "or", "pa", "ne", "as", "si", "ur"),
    "Iranian": ("fa", "ku", "ckb", "tg"),
    "Dravidian": ("ta", "kn", "te", "ml"),
    "Semitic": ("ar", "he", "am", "mt"),
    "Turkic": ("tr", "az", "kk", "ky", "uz", "tt", "ug"),
    "Kartvelian": ("ka",),
    "Chinese": ("zh",),
    "Japonic": ("ja",),
    "Koreanic": ("ko",),
    "Vietic": ("vi",),
    "Austronesian": ("id", "ms", "tl", "fil"),
    "Tai": ("th", "lo"),
    "Basque": ("eu",),
    "Constructed": ("eo", "ia", "io"),
}
_BY_CODE = {code: name for name, codes in FAMILIES.items() for code in codes}


def base(lang: str) -> str:
    """``pt_BR`` -> ``pt``, ``sr@latin`` -> ``sr``."""
    return lang.split("@")[0].split("_")[0]


def family(lang: str | None) -> str:
    """The family of a language code (variants follow their base language); unknown: the
    code itself, None: 'other'."""
    if not lang:
        return "other"
    return _BY_CODE.get(base(lang), base(lang))


def task_language(name: str, language: str | None = None) -> str | None:
    """A task's non-English language: ``language`` when known (train_summary), else read from
    a family name (``en-de`` -> de, ``de-en`` -> de)."""
    if language:
        return language
    left, sep, right = name.partition("-")
    if not sep:
        return None
    return right if left == "en" else left if right == "en" else None
