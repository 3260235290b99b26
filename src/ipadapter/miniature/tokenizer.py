"""A word-level vocabulary written in the CLIP BPE file format, so `transformers.CLIPTokenizer` loads it unchanged.

Every word of the world's grammar must become exactly one token (one word = one slot the text transformer can bind
to its neighbours). We learn BPE merges on the word list until each word is a single symbol; applying merges by
rank, as CLIP's tokenizer does, then reproduces exactly that segmentation.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ipadapter.miniature.world import ATTRIBUTES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16
_EOW = "</w>"
_GRAMMAR_WORDS = ("a", "at", "the", "on", "background", "striped", "object")


def vocabulary_words() -> list[str]:
    """All words that captions use, sorted (fixed order keeps token ids stable)."""
    words = set(_GRAMMAR_WORDS)
    for values in ATTRIBUTES.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on distinct words until every word is one symbol; ties broken lexicographically (deterministic)."""
    segmented = {w: [*w[:-1], w[-1] + _EOW] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in segmented.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[w] = merged


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Token -> id (BOS 0, EOS 1, then characters, merge products) and the ranked merges."""
    words = vocabulary_words()
    merges = _learn_merges(words)
    chars = sorted({c for w in words for c in w} | {c + _EOW for c in "".join(words)})
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for token in chars + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def save_tokenizer(out_dir: str | Path, max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json that `CLIPTokenizer.from_pretrained` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2),
        encoding="utf-8",
    )
    return out


def load_tokenizer(path: str | Path):
    """The saved tokenizer as a `transformers.CLIPTokenizer`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def vocab_size() -> int:
    return len(build_vocab()[0])
