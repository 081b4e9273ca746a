"""Turning what a person typed into the prompt the model reads: handle insertion, styles, length check.

A DreamBooth LoRA learns a person as "<handle> <class word>" (it is trained on "a photo of zqjane
woman"), so a prompt works best when it names them the same way. The rule, kept deliberately simple:

- the handle is missing (as a whole word, any case): the prompt is prefixed with the style's subject
  phrase, "a photo of zqjane woman, as an astronaut on the moon";
- the handle is there but not followed by the class word: the class word is inserted after its first
  occurrence, "zqjane on a horse" becomes "zqjane woman on a horse" (a possessive "zqjane's" is left
  as written);
- otherwise the prompt is kept as typed.

A style appends its words at the end. The result is checked against the text encoder's context
(77 tokens for CLIP, start and end markers included) and refused with `PromptTooLong` rather than
silently cut, because the cut-off words would simply be ignored by the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jobs.requests import STYLES
from trainer.errors import PromptTooLong

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


DEFAULT_SUBJECT = "a photo of"


def _mentions(prompt: str, word: str) -> re.Match[str] | None:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)


def name_person(prompt: str, handle: str | None, class_word: str | None, style: str | None = None) -> str:
    """The prompt with the person named as they were trained (see the module docstring for the rule)."""
    text = " ".join(prompt.split())
    if not handle:
        return text
    found = _mentions(text, handle)
    if found is None:
        subject = " ".join(w for w in (handle, class_word) if w)
        intro = f"{STYLES[style].subject if style else DEFAULT_SUBJECT} {subject}"
        return f"{intro}, {text}" if text else intro
    rest = text[found.end():]
    if class_word and not re.match(r"['’]\w", rest) and not re.match(
            rf"\s+{re.escape(class_word)}(?!\w)", rest, flags=re.IGNORECASE):
        return f"{text[:found.end()]} {class_word}{rest}"
    return text


def apply_style(text: str, style: str | None) -> str:
    """`text` with the style's words appended."""
    if not style:
        return text
    words = STYLES[style].words
    return f"{text}, {words}" if text else words


def compose_prompt(prompt: str, handle: str | None, class_word: str | None, style: str | None) -> str:
    """The prompt the model reads: the person named as trained, then the style's words."""
    return apply_style(name_person(prompt, handle, class_word, style), style)


def additions(prompt: str, handle: str | None, class_word: str | None, style: str | None) -> str:
    """What `compose_prompt` adds to the typed words, said for a person ("your handle and the anime style")."""
    parts = []
    if name_person(prompt, handle, class_word, style) != " ".join(prompt.split()):
        parts.append("your handle")
    if style:
        parts.append(f"the {style} style")
    return " and ".join(parts)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens the encoder would see, start and end markers included, before any truncation."""
    return len(tokenizer(text).input_ids)


def check_prompt(tokenizers: Sequence[PreTrainedTokenizerBase], text: str, *, what: str = "prompt",
                 added: str = "") -> None:
    """Raise PromptTooLong when `text` needs more tokens than any of `tokenizers` reads.

    `what` names the field in the message ("prompt", "negative prompt"); `added` says what was added
    to the person's words (their handle, a style), so they know why a short prompt came out long.
    """
    for tokenizer in tokenizers:
        limit = tokenizer.model_max_length
        count = count_tokens(tokenizer, text)
        if count > limit:
            extra = f" once {added} is added" if added else ""
            raise PromptTooLong(
                f"Your {what} is too long: it comes to {count} tokens{extra}, and the model reads at most "
                f"{limit} (start and end markers included). Please shorten it by at least {count - limit} "
                "tokens; a token is a short word, a punctuation mark or part of a longer word.")
