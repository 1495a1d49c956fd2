"""Byte-level BPE tokenizer (GPT-2 style), built from the vocabulary and merges stored in a GGUF file.

Papers: BPE for subwords (Sennrich et al. 2016, arXiv:1508.07909, §3.1, Algorithm 1), applied to
UTF-8 *bytes* as in GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners",
§2.2 "Input Representation"), so every string is encodable and no unknown token is ever needed.

Encoding has three stages:
1. special tokens (GGUF token type 3 = control, e.g. ``<|im_start|>``) are cut out of the text whole;
2. pre-tokenization splits the rest into words with a regex, and merges never cross a word boundary.
   GPT-2's regex: contractions, `` ?letters``, `` ?numbers``, `` ?other symbols``, whitespace runs
   (the last space of a run goes to the next word). SmolLM2 (GGUF ``tokenizer.ggml.pre = "smollm"``,
   like StarCoder) first isolates every single digit, so numbers become one token per digit;
3. each word's bytes are mapped to printable characters (``bytes_to_unicode``), then the merges are
   applied in rank order: repeatedly merge the adjacent pair with the lowest rank (Algorithm 1 replayed).

Decoding maps token strings back to bytes and decodes UTF-8 (invalid partial sequences -> U+FFFD).

Left out: sentencepiece/unigram vocabularies, normalizers, offsets, training. The one idea to notice:
the merges are a *priority list*, and replaying it greedily on each pre-token reproduces exactly the
segmentation the training run would have produced. Needs the ``regex`` package for ``\\p{L}``/``\\p{N}``.
"""

from __future__ import annotations

import copy
from functools import lru_cache

__all__ = ["Tokenizer", "bytes_to_unicode", "GPT2_SPLIT", "PRE_TOKENIZERS"]

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# pre-tokenizer name in GGUF metadata -> (isolate single digits first?, word regex), after llama.cpp
PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT),
    "gpt2": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT),
    "starcoder": (True, GPT2_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)  # unprintable bytes get code points 256, 257, ...
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def _regex():
    try:
        import regex
    except ImportError as error:  # pragma: no cover - regex ships with transformers and most installs
        raise ImportError("the tokenizer needs the 'regex' package (for \\p{L} and \\p{N}): pip install regex") from error
    return regex


class Tokenizer:
    """tokens[i] is the byte-level spelling of id i; merges are "left right" strings in rank order."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int] | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pre: str = "gpt2",
                 chat_template: str | None = None, unk_token_id: int | None = None):
        if not tokens:
            raise ValueError("tokens must be a non-empty list of strings")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
        if token_types is not None and len(token_types) != len(tokens):
            raise ValueError(f"token_types has {len(token_types)} entries, tokens {len(tokens)}")
        for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if value is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{name} {value} is outside the vocabulary of {len(tokens)}")
        regex = _regex()
        self.tokens = list(tokens)
        self.vocab = {token: index for index, token in enumerate(self.tokens)}
        self.ranks = {tuple(merge.split(" ", 1)): rank for rank, merge in enumerate(merges)}
        self.bos_token_id, self.eos_token_id, self.unk_token_id = bos_token_id, eos_token_id, unk_token_id
        self.pre, self.chat_template = pre, chat_template
        self.special_ids = {i for i, kind in enumerate(token_types or []) if kind == 3}  # 3 = CONTROL
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        isolate_digits, split = PRE_TOKENIZERS[pre]
        self._digits = regex.compile(r"\p{N}") if isolate_digits else None
        self._split = regex.compile(split)
        specials = sorted((self.tokens[i] for i in self.special_ids), key=len, reverse=True)  # longest first
        self._special = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")") if specials else None
        self._bpe = lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    def __len__(self) -> int:
        return len(self.tokens)

    def with_pre_tokenizer(self, pre: str) -> "Tokenizer":
        """The same vocabulary and merges with another pre-tokenizer (e.g. "gpt2" to compare with tools that ignore "smollm")."""
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
        other = copy.copy(self)
        isolate_digits, split = PRE_TOKENIZERS[pre]
        other.pre, other._split = pre, _regex().compile(split)
        other._digits = _regex().compile(r"\p{N}") if isolate_digits else None
        other._bpe = lru_cache(maxsize=1 << 16)(other._bpe_uncached)
        return other

    # -- stage 2: pre-tokenization
    def pre_tokenize(self, text: str) -> list[str]:
        pieces = [text]
        if self._digits is not None:  # each digit becomes its own piece, the text between stays whole
            pieces = []
            last = 0
            for match in self._digits.finditer(text):
                pieces += [text[last:match.start()], match.group()]
                last = match.end()
            pieces.append(text[last:])
        return [word for piece in pieces if piece for word in self._split.findall(piece)]

    # -- stage 3: byte-level BPE on one word
    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        parts = list(word)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break  # no adjacent pair is a known merge
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for part in parts:
            if part not in self.vocab:
                if self.unk_token_id is None:
                    raise ValueError(f"piece {part!r} is not in the vocabulary and there is no unknown token")
                ids.append(self.unk_token_id)
            else:
                ids.append(self.vocab[part])
        return tuple(ids)

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens spelled in the text become their id when ``parse_special``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        chunks = self._special.split(text) if parse_special and self._special is not None else [text]
        for index, chunk in enumerate(chunks):
            if index % 2 == 1:  # odd chunks are the captured special tokens
                ids.append(self.vocab[chunk])
                continue
            for word in self.pre_tokenize(chunk):
                ids.extend(self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 become U+FFFD."""
        pieces = []
        for token_id in ids:
            if not isinstance(token_id, int) or not 0 <= token_id < len(self.tokens):
                raise ValueError(f"token id {token_id!r} is outside the vocabulary of {len(self.tokens)}")
            if skip_special and token_id in self.special_ids:
                continue
            pieces.append(self.tokens[token_id])
        data = bytes(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the GGUF's Jinja chat template (``tokenizer.chat_template``); needs ``jinja2``."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        template = jinja2.Environment().from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


if __name__ == "__main__":
    from mlsys_ref.serving.loader import load_gguf_tokenizer, smollm2_gguf_path

    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    text = "To be, or not to be: that is the question. 2026 années — ünïcödé  spaces\n\n"
    ids = tokenizer.encode(text)
    print(f"{len(tokenizer)} tokens, pre-tokenizer {tokenizer.pre!r}")
    print(f"{text!r}\n-> {ids}\n-> {[tokenizer.tokens[i] for i in ids]}")
    print(f"round trip exact: {tokenizer.decode(ids) == text}")
