"""Rules for handles (the rare word a person's model learns as "them") and class words.

DreamBooth binds a person to a word the text encoder has little prior for. A common word ("alex",
"king") drags its old meaning into every picture, and a handle containing the class word
("womanzq") blurs the person with the class the model is taught to preserve. Every refusal comes
with a reason written for the person reading it in Discord.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Container, Iterator

MIN_LEN = 3
MAX_LEN = 24
MAX_CLASS_WORD_LEN = 24
# Zipf 3.0 = once per million words of English text: frequent enough that the text encoder has a
# settled meaning for it (names like "alex" sit near 4.6), while coined words ("zorblax") score 0.
COMMON_WORD_ZIPF = 3.0
# A class word shorter than this ("ox") would forbid too many handles if checked as a part.
_MIN_CLASS_PART = 3
# Suggestions keep at most this much of a Discord name, leaving room for the suffix.
_SUGGEST_BASE_LEN = 12
_FALLBACK_BASE = "avatar"
# Rare consonant pairs: they read as made-up, and the text encoder knows almost nothing of them.
_SUFFIX_PAIRS = ["zq", "qx", "vz", "xq", "kz", "qv", "zx", "jq", "qk", "vq", "xz", "zv"]

_HANDLE_RE = re.compile(r"[a-z0-9]+")
_CLASS_WORD_RE = re.compile(r"[a-z]+( [a-z]+){0,2}")


class NameRuleError(ValueError):
    """A handle or class word was refused; ``reason`` is the sentence to show the person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HandleError(NameRuleError):
    """The handle breaks one of the handle rules."""


class HandleTakenError(HandleError):
    """The handle is valid but somebody else already has it."""


class ClassWordError(NameRuleError):
    """The class word is not a short plain description."""


def _is_common_word(word: str) -> bool:
    # Imported here: wordfreq's word lists are large, and GPU workers that only read users never need them.
    from wordfreq import zipf_frequency

    return bool(word) and zipf_frequency(word, "en") >= COMMON_WORD_ZIPF


def load_word_list() -> None:
    """Read wordfreq's English list now (about a second), so the first handle checked doesn't wait."""
    _is_common_word("avatar")


def normalize_class_word(class_word: str) -> str:
    """Return the class word lower-cased with single spaces, or raise ClassWordError."""
    text = " ".join(class_word.lower().split())
    if not text:
        raise ClassWordError(
            "Please tell me what kind of subject you are, for example 'woman', 'man' or 'person'."
        )
    if len(text) > MAX_CLASS_WORD_LEN:
        raise ClassWordError(
            f"That description is a bit long: please keep it to {MAX_CLASS_WORD_LEN} characters, "
            "like 'woman', 'man' or 'person'."
        )
    if not _CLASS_WORD_RE.fullmatch(text):
        raise ClassWordError(
            "Please describe yourself with one to three plain words (letters a–z and spaces only), "
            "like 'woman', 'man', 'person' or 'old man'."
        )
    return text


def _class_word_parts(class_word: str | None) -> list[str]:
    """The class word run together and its last word (the noun: "man" in "old man")."""
    words = (class_word or "").lower().split()
    if not words:
        return []
    parts = {"".join(words), words[-1]}
    return sorted((p for p in parts if len(p) >= _MIN_CLASS_PART), key=len, reverse=True)


def _without(text: str, parts: list[str]) -> str:
    """``text`` with every part removed, repeated until none is left ("womanman" -> "")."""
    while any(part in text for part in parts):
        for part in parts:
            text = text.replace(part, "")
    return text


def _problem(handle: str, class_word: str | None) -> str | None:
    """The reason ``handle`` (already lower-cased) is refused, without any suggestion; None if fine."""
    if len(handle) < MIN_LEN:
        return f"A handle needs at least {MIN_LEN} characters."
    if len(handle) > MAX_LEN:
        return f"That handle is a bit long: please keep it to {MAX_LEN} characters or fewer."
    if not _HANDLE_RE.fullmatch(handle):
        return "Handles can only use the letters a–z and the digits 0–9: no spaces, accents or symbols."
    if handle.isdigit():
        return "A handle needs at least one letter, not only digits."
    for part in _class_word_parts(class_word):
        if part in handle:
            return (
                f"Your handle can't contain your class word '{part}': the model has to tell "
                f"you apart from every other {' '.join((class_word or '').lower().split())}."
            )
    if _is_common_word(handle):
        return (
            f"'{handle}' is a common English word, so the model would mix you up with what it "
            "already knows about it. A rare, made-up word works best."
        )
    core = handle.strip("0123456789")
    if core != handle and _is_common_word(core):
        return (
            f"'{handle}' is built on the common English word '{core}', so the model would mix you up "
            "with what it already knows about it. A rare, made-up word works best."
        )
    return None


def validate_handle(handle: str, class_word: str | None = None) -> str:
    """Return the handle normalised (trimmed, lower-case) or raise HandleError with a kind reason.

    When the rule broken is about the word itself, the reason ends with a suggestion the person
    can use as it is (it is not checked against handles already taken).
    """
    text = handle.strip().lower()
    reason = _problem(text, class_word)
    if reason is None:
        return text
    if len(text) >= MIN_LEN and _HANDLE_RE.fullmatch(text):
        reason += f" How about '{suggest_handle(text, set(), class_word)}'?"
    raise HandleError(reason)


def _name_letters(discord_name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", discord_name).encode("ascii", "ignore").decode().lower()
    return "".join(ch for ch in ascii_name if ch.isalnum())[:_SUGGEST_BASE_LEN]


def _suggestion_base(discord_name: str, class_word: str | None = None) -> str:
    """A Discord name's ascii letters and digits, lower-cased, trimmed and without the class word
    ("Zoë ✨" -> "zoe"); a fixed word when nothing usable is left."""
    parts = _class_word_parts(class_word)
    base = _without(_name_letters(discord_name), parts)
    if not any(ch.isalpha() for ch in base):
        base = _without(_FALLBACK_BASE, parts)
    return base


def _candidates(base: str) -> Iterator[str]:
    """The name itself, then the name with rare pairs, then with a pair and a number: never ends."""
    yield base
    for pair in _SUFFIX_PAIRS:
        yield base + pair
    for number in itertools.count(2):
        for pair in _SUFFIX_PAIRS:
            yield f"{base}{pair}{number}"


def suggest_handle(
    discord_name: str,
    taken: Callable[[str], bool] | Container[str],
    class_word: str | None = None,
) -> str:
    """A valid handle derived from a Discord name that ``taken`` does not report as used.

    Deterministic: the same name and the same taken handles always give the same suggestion.
    """
    is_taken = taken if callable(taken) else taken.__contains__
    for candidate in _candidates(_suggestion_base(discord_name, class_word)):
        if _problem(candidate, class_word) is None and not is_taken(candidate):
            return candidate
    raise AssertionError("unreachable: the candidate sequence is infinite")
