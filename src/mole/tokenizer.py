"""The byte-level BPE pieces of a CLIP tokenizer, written offline: the mapping, a small vocabulary, the folder.

Shared by the tiny model (:mod:`mole.tiny`), the caption cleaner (:mod:`mole.data.captions`, to count CLIP
tokens) and the OpenAI-CLIP scorers (:mod:`mole.evaluate.scorers.openai_clip`, which need CLIP's byte mapping),
so none of them imports the toy model to tokenize.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

# Words that get their own BPE token, so that captions of the synthetic data tokenize like real text
# (one token per word) rather than one token per character. Anything else still tokenizes, one
# byte-level symbol at a time, exactly as CLIP's tokenizer does for rare words.
_WORDS = """
a an the of and with in on at to from by for is are his her their its this that one two three four five
photo picture image portrait close-up closeup up close view shot detailed high quality realistic drawing
person people man men woman women child children kid kids girl girls boy boys lady gentleman teenager
baby adult old young face faces head hair eyes eye nose mouth lips ear ears smile smiling neutral
surprised sad happy glasses beard mustache bald short long curly straight hand hands finger fingers
thumb palm fist pointing peace sign thumbs open closed wave waving holding making gesture raised foot
feet toes shoe shoes sock socks bare barefoot leg legs arm arms body standing sitting walking running
lying dancing together next each other group crowd couple shirt dress jacket coat pants skirt hat
wearing clothes sleeve suit red green blue yellow orange purple pink brown black white gray grey dark
light skin tone pale tan park street beach room city forest field garden house building tree trees sky
sun cloud clouds grass sand floor wall road water background plain simple indoor outdoor scene flower
pen cup ball phone book bag umbrella
""".split()

_SPECIAL_BOS = "<|startoftext|>"
_SPECIAL_EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters, in CLIP's order (it fixes the
    vocabulary ids; the HPS v1 tokenizer in :mod:`mole.evaluate.scorers.openai_clip` uses it too)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Train a CLIP-style byte-level BPE vocabulary on a word list.

    The layout matches OpenAI CLIP's: the 256 byte symbols, the same with the end-of-word marker
    ``</w>``, one token per merge, then the two special tokens. The merges are learned by plain BPE
    (most frequent pair first, ties broken alphabetically), which guarantees that applying them in rank
    order turns each training word into a single token.

    Returns:
        ``(vocab, merges)``: token → id, and merge rules as ``"left right"`` strings in rank order.
    """
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    known = set(vocab_list)
    segmented = [[*list(w[:-1]), w[-1] + "</w>"] for w in dict.fromkeys(words if words is not None else _WORDS)]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in segmented:
            for pair in itertools.pairwise(parts):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:
            known.add(merged)
            vocab_list.append(merged)
        for k, parts in enumerate(segmented):
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            segmented[k] = out
    vocab_list += [_SPECIAL_BOS, _SPECIAL_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | os.PathLike[str]) -> Path:
    """Write a loadable ``CLIPTokenizer`` folder (vocab.json, merges.txt, tokenizer_config.json).

    ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores its files in transformers 5, so the
    tokenizer is always built through ``from_pretrained`` on a folder like this one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": 77,
        "bos_token": _SPECIAL_BOS,
        "eos_token": _SPECIAL_EOS,
        "unk_token": _SPECIAL_EOS,
        "pad_token": _SPECIAL_EOS,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
