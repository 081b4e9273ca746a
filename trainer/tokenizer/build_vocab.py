"""Regenerates the small byte-level BPE tokenizer files (vocab.json, merges.txt) in this folder.

The tiny and random models need a real `CLIPTokenizer` without downloading OpenAI's 49k-token vocabulary.
This builds one with CLIP's layout: the 256 byte-unicode characters, their end-of-word (`</w>`) forms,
one token per learned merge, then `<|startoftext|>` and `<|endoftext|>`. The merges are learned by plain
BPE on a short list of common English and prompt words until each of them is a single token, so ordinary
prompts tokenize about as compactly as with the real vocabulary and fit its 77-token context.

Run: `python -m trainer.tokenizer.build_vocab` (deterministic; rewrites the files in place).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Common English words plus words people put in image prompts. Order does not matter.
CORPUS = """
a an the of and or to in on at by for with from as is are was were be been it its this that these those
he she they we you i me my your his her their our them him who what when where why how which there here
not no yes all any some many more most other such only own same so than too very can will just should now
one two three four five six seven eight nine ten first last new old good great little big small long high
photo photograph picture image portrait painting drawing illustration sketch render art artwork style
woman man person people girl boy child baby lady gentleman face head hair eyes smile beard glasses
dog cat bird horse animal pet puppy kitten
wearing holding standing sitting walking running looking smiling posing dressed
red orange yellow green blue purple pink brown black white gray grey gold silver colorful
light dark bright soft warm cold sunny night day morning evening sunset sunrise golden hour
city street park beach forest mountain river lake ocean sea sky cloud clouds snow rain garden room
house home building castle office studio background landscape scene nature space planet stars moon sun
detailed highly realistic photorealistic cinematic lighting dramatic sharp focus depth field bokeh lens
camera shot closeup close up wide angle full body upper headshot professional quality resolution
masterpiece best beautiful handsome pretty cute elegant epic fantasy science fiction cyberpunk steampunk
anime cartoon comic oil watercolor pencil digital concept trending artstation octane unreal engine
blurry ugly deformed distorted disfigured bad anatomy extra limbs missing fingers hands low worst text
watermark signature cropped out frame duplicate mutated poorly drawn jpeg artifacts noise grain
astronaut knight wizard warrior king queen prince princess superhero pirate chef doctor teacher
suit dress shirt jacket coat hat helmet armor crown jeans shoes uniform costume
in front behind under over above below inside outside near next between through around into onto
make made makes making take took taking give gave see saw seen look looks find found use used
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties alphabetical) until every word is one token."""
    byte_map = bytes_to_unicode()
    counts = Counter(words)
    seqs: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[tuple(chars)] = n
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_seqs: dict[tuple[str, ...], int] = {}
        for seq, n in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + n
        seqs = new_seqs
    return merges


def build(out_dir: Path = HERE) -> int:
    """Write vocab.json and merges.txt into `out_dir`; returns the vocabulary size."""
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(CORPUS)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


if __name__ == "__main__":
    build()
