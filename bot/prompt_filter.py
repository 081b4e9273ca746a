"""The prompt filter: words and phrases a server does not want drawn, found however they are spelled.

Entries match whole words (case and accents ignored), so "Scunthorpe", "class" and "therapist" pass
a list that holds the words inside them. A few simple disguises are seen through: letters spelled out
one by one with spaces or punctuation between them ("n.u.d.e"), repeated letters ("nuuude"), digits
and symbols for letters ("nud3", "pr0n", "@$$") and invisible characters. An entry that ends in `*`
also matches the words it begins ("masturbat*"). The list shipped in bot/blocked_words.txt is read
once at start, with the operator's own file (BLOCKED_WORDS_FILE) added to it.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SHIPPED_LIST = Path(__file__).with_name("blocked_words.txt")

# What may stand for a letter: digits and symbols people type instead of it.
_LOOK_ALIKES = {"a": "4@", "b": "8", "e": "3", "g": "9", "i": "1", "l": "1", "o": "0", "s": "5$", "t": "7", "z": "2"}
_WORD_CHAR = r"(?:[^\W_]|[@$])"  # letters and digits of any script, and the symbols above
_TOKEN = re.compile(rf"{_WORD_CHAR}+")
_BEFORE = rf"(?<!{_WORD_CHAR})"
_AFTER = rf"(?!{_WORD_CHAR})"


def _read(text: str) -> tuple[list[str], list[str]]:
    """The words of `text` as the filter reads them (lower case, without accents or invisible
    characters), with each run of single letters joined into one word ("n u d e": "nude"); and
    those joined runs apart, to be searched inside ("a n u d e": "anude" holds "nude")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c) and unicodedata.category(c) != "Cf")
    words: list[str] = []
    runs: list[str] = []
    spelled: list[str] = []  # single letters in a row
    for token in [*_TOKEN.findall(plain), ""]:  # the empty token ends the last run
        if len(token) == 1:
            spelled.append(token)
            continue
        if len(spelled) > 1:
            runs.append("".join(spelled))
        words += ["".join(spelled)] if spelled else []
        words += [token] if token else []
        spelled = []
    return words, runs


def normalise(text: str) -> str:
    """`text` as the filter reads it: its words, separated by single spaces."""
    return " ".join(_read(text)[0])


def _letters(word: str) -> str:
    """A pattern for one word of an entry: each letter or its look-alikes, a run of one letter
    repeated at will ("nuuude"), but never shorter than written ("ass" does not match "as")."""
    parts = []
    for run in re.finditer(r"(.)\1*", word):
        letter, count = run.group(1), len(run.group(0))
        choices = re.escape(letter) + re.escape(_LOOK_ALIKES.get(letter, ""))
        parts.append(f"[{choices}]{{{count},}}" if len(choices) > 1 or count > 1 else f"{re.escape(letter)}+")
    return "".join(parts)


def entry_pattern(entry: str, *, whole: bool = True) -> str | None:
    """The pattern of one list entry (a word or phrase, `*` at its end for a prefix), None if empty;
    `whole`: it matches whole words only (where a word begins is checked once for all entries)."""
    prefix = entry.rstrip().endswith("*")
    words = normalise(entry.rstrip().rstrip("*")).split()
    if not words:
        return None
    letters = " ".join(_letters(word) for word in words)
    return letters + ("" if prefix else _AFTER) if whole else letters


def read_entries(lines: Iterable[str]) -> list[str]:
    """The entries of a list file: one a line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class PromptFilter:
    """Finds blocked words and phrases in prompts."""

    def __init__(self, entries: Iterable[str]) -> None:
        entries = list(entries)
        patterns = sorted({p for entry in entries if (p := entry_pattern(entry)) is not None})
        # Inside spelled-out letters, single words are searched anywhere: nobody spells innocently.
        inside = sorted({p for entry in entries if len(entry.split()) == 1
                         and (p := entry_pattern(entry, whole=False)) is not None})
        self.size = len(patterns)
        self._words = re.compile(_BEFORE + "(?:" + "|".join(patterns) + ")") if patterns else None
        self._inside = re.compile("|".join(inside)) if inside else None

    @classmethod
    def load(cls, extra_file: Path | None = None) -> PromptFilter:
        """The shipped list, with the operator's own file added (reads files: call it in a thread)."""
        entries = read_entries(SHIPPED_LIST.read_text(encoding="utf-8").splitlines())
        if extra_file is not None:
            own = read_entries(extra_file.read_text(encoding="utf-8", errors="replace").splitlines())
            log.info("prompt filter: %d entries of %s added to the shipped list", len(own), extra_file)
            entries += own
        return cls(entries)

    def blocks(self, *texts: str | None) -> bool:
        """Whether any of `texts` holds a blocked word or phrase."""
        for text in texts:
            if not text:
                continue
            words, runs = _read(text)
            if self._words is not None and self._words.search(" ".join(words)):
                return True
            if self._inside is not None and any(self._inside.search(run) for run in runs):
                return True
        return False
