"""Reference generation: the contiguous KV cache changes nothing but the cost."""

import pytest
import torch

from mlsys_ref.serving.generate import ContiguousKVCache, generate
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.testing import assert_close
from engine_helpers import one_thread  # noqa: F401 (autouse: this module runs on one intra-op thread)


@pytest.fixture(scope="module")
def tiny():
    return Llama.random(LlamaConfig.tiny(), seed=3, std=0.3)


@pytest.mark.parametrize("prompt_len", [1, 7, 33])
def test_greedy_cache_equals_recompute(tiny, prompt_len):
    prompt = torch.randint(3, 97, (prompt_len,)).tolist()
    cached = generate(tiny, prompt, 25, stop_token_ids=[])
    recomputed = generate(tiny, prompt, 25, stop_token_ids=[], use_cache=False)
    assert cached == recomputed and len(cached) == 25


def test_sampling_cache_equals_recompute(tiny):
    prompt = [5, 6, 7, 8]
    runs = [generate(tiny, prompt, 30, stop_token_ids=[], temperature=1.0, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(11)) for use_cache in (True, False)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 3  # really sampled, not stuck on one token


def test_stops_after_emitting_stop_token(tiny):
    prompt = [5, 6, 7, 8]
    free = generate(tiny, prompt, 20, stop_token_ids=[])
    stop = free[4]
    stopped = generate(tiny, prompt, 20, stop_token_ids=[stop])
    assert stopped == free[: free.index(stop) + 1]
    assert generate(tiny, prompt, 0) == []


def test_truncate_rolls_back(tiny):
    """Feeding tokens, truncating, and feeding others gives the logits of the second sequence alone."""
    cache = ContiguousKVCache(tiny.config, max_len=32)
    first, other = torch.tensor([4, 5, 6, 7, 8, 9]), torch.tensor([40, 41, 42])
    tiny(first, cache.positions(6), cache.attend)
    cache.truncate(3)
    logits = tiny(other, cache.positions(3), cache.attend)
    expected = tiny.forward_dense(torch.cat([first[:3], other])[None])[0, 3:]
    assert_close(logits, expected, name="after rollback")
    with pytest.raises(ValueError, match="num_tokens"):
        cache.truncate(7)


def test_bad_arguments_raise(tiny):
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(tiny, [], 3)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(tiny, [1, 500], 3)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(tiny, [1], -1)
    with pytest.raises(ValueError, match="context"):
        generate(tiny, [1] * 200, 100)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, [1], 3, temperature=-1.0)


def test_cache_grows_past_its_first_allocation(tiny):
    """600 positions: the cache starts at 256 rows and doubles; logits still equal the dense forward."""
    model = Llama.random(LlamaConfig.tiny(max_position_embeddings=700), seed=3, std=0.3)
    cache = ContiguousKVCache(model.config)
    tokens = torch.randint(0, 97, (600,))
    with torch.no_grad():
        pieces = [model(tokens[a:b], cache.positions(b - a), cache.attend) for a, b in [(0, 200), (200, 300), (300, 600)]]
        dense = model.forward_dense(tokens[None])[0]
    assert cache.k[0].shape[0] == 700 and len(cache) == 600  # 256 -> 512 -> capped at max_len
    assert_close(torch.cat(pieces), dense, name="logits across cache growth")
