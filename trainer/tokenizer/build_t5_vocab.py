"""Regenerates the small T5 tokenizer (t5/tokenizer.json) the tiny and random Flux models use.

Flux reads prompts through T5 as well as CLIP. T5's own tokenizer is a SentencePiece unigram model of
32k pieces, and reading its `spiece.model` needs the sentencepiece package and a download. This builds
a unigram model of the same kind offline with the tokenizers library: T5's special tokens first
(`<pad>` 0, `</s>` 1, `<unk>` 2, as in the real vocabulary), one `▁word` piece for each word of the CLIP
tokenizer's corpus (trainer/tokenizer/build_vocab.py), then single characters, with and without the
word-start mark, so any ASCII prompt tokenizes without unknown pieces. `T5TokenizerFast` reads it.

Run: `python -m trainer.tokenizer.build_t5_vocab` (deterministic; rewrites the files in place).
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import T5TokenizerFast

from trainer.tokenizer.build_vocab import CORPUS

OUT = Path(__file__).resolve().parent / "t5"
MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 and train_dreambooth_lora_flux.py's --max_sequence_length
SPECIAL = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]


def pieces() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs: whole words are likelier than spelling them out."""
    chars = string.ascii_letters + string.digits + string.punctuation
    words = [("▁" + word, -5.0) for word in sorted(set(CORPUS))]
    return [*SPECIAL, *words, ("▁", -8.0), *(("▁" + c, -9.0) for c in chars), *((c, -10.0) for c in chars)]


def build(out_dir: Path = OUT) -> int:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; returns the vocabulary size."""
    tokenizer = T5TokenizerFast(vocab=pieces(), extra_ids=0, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(str(out_dir))
    return len(tokenizer)


if __name__ == "__main__":
    build()
