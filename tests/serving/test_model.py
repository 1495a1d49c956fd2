"""The Llama model on tiny random configs: cached and packed forwards equal the dense causal forward."""

import pytest
import torch

from mlsys_ref.attention.reference import attention_varlen_reference
from mlsys_ref.serving.generate import ContiguousKVCache
from mlsys_ref.serving.model import Llama, LlamaConfig, rope_inverse_frequencies
from mlsys_ref.testing import assert_close


@pytest.fixture(scope="module")
def tiny():
    return Llama.random(LlamaConfig.tiny(), seed=1)


@pytest.mark.parametrize("chunks", [[37], [1] * 9, [13, 1, 1, 7, 1, 15]])
def test_cached_forward_equals_dense(tiny, chunks):
    """Prefill, chunked prefill and decode through the contiguous cache give forward_dense's logits."""
    tokens = torch.randint(0, tiny.config.vocab_size, (sum(chunks),))
    dense = tiny.forward_dense(tokens[None])[0]  # [S, vocab]
    cache = ContiguousKVCache(tiny.config, max_len=64)
    pieces, start = [], 0
    for size in chunks:
        step = tokens[start:start + size]
        pieces.append(tiny(step, cache.positions(size), cache.attend))
        start += size
    assert_close(torch.cat(pieces), dense, name="cached logits")
    assert len(cache) == sum(chunks)


def test_packed_sequences_and_logits_indices(tiny):
    """Two sequences packed into one step (varlen attention) give each one's dense logits."""
    a, b = torch.randint(0, 97, (11,)), torch.randint(0, 97, (5,))
    cu = torch.tensor([0, 11, 16])

    def attend(layer, q, k, v):
        out, _ = attention_varlen_reference(q, k, v, cu, cu, causal=True)
        return out

    tokens, positions = torch.cat([a, b]), torch.cat([torch.arange(11), torch.arange(5)])
    last = torch.tensor([10, 15])
    logits = tiny(tokens, positions, attend, logits_indices=last)
    expected = torch.stack([tiny.forward_dense(a[None])[0, -1], tiny.forward_dense(b[None])[0, -1]])
    assert logits.shape == (2, 97) and logits.dtype == torch.float32
    assert_close(logits, expected, name="packed last-token logits")


def test_untied_and_truncated(tiny):
    config = LlamaConfig.tiny(tie_embeddings=False, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=12)
    model = Llama.random(config, seed=2)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert tiny.lm_head.weight is tiny.embed_tokens.weight
    tokens = torch.randint(0, 97, (1, 9))
    # a truncated forward equals a model holding only those layers
    shallow = Llama(LlamaConfig.tiny(tie_embeddings=False, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=12))
    shallow.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("layers.1", "layers.2"))})
    assert_close(model.forward_dense(tokens, num_layers=1), shallow.forward_dense(tokens), name="truncated")


def test_rope_rotation_preserves_norm_and_relative_positions(tiny):
    """RoFormer §3.4: <R_m q, R_n k> depends only on m - n; rotations keep norms."""
    from mlsys_ref.serving.model import apply_rope

    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def rotated_dot(m, n):
        cos_m, sin_m = tiny.rope(torch.tensor([m]))
        cos_n, sin_n = tiny.rope(torch.tensor([n]))
        return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum()

    assert_close(rotated_dot(7, 3), rotated_dot(104, 100), name="relative position")
    cos, sin = tiny.rope(torch.tensor([55]))
    assert_close(apply_rope(q, cos, sin).norm(), q.norm(), name="norm")


def test_llama3_rope_scaling_changes_only_low_frequencies():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    plain = rope_inverse_frequencies(LlamaConfig.tiny(head_dim=32))
    scaled = rope_inverse_frequencies(LlamaConfig.tiny(head_dim=32, rope_scaling=scaling))
    assert torch.equal(scaled[:2], plain[:2])  # highest frequencies untouched
    assert_close(scaled[-1:], plain[-1:] / 8.0, name="lowest frequency / factor")


def test_bad_inputs_raise(tiny):
    cache = ContiguousKVCache(tiny.config, max_len=8)
    with pytest.raises(ValueError, match="tokens"):
        tiny(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache.attend)
    with pytest.raises(ValueError, match="positions"):
        tiny(torch.tensor([1, 2]), torch.tensor([0]), cache.attend)
    with pytest.raises(ValueError, match="tokens must lie"):
        tiny(torch.tensor([1, 97]), torch.tensor([0, 1]), cache.attend)
    with pytest.raises(ValueError, match="KV cache full"):
        tiny(torch.arange(9), torch.arange(9), cache.attend)
    with pytest.raises(ValueError, match="num_heads"):
        LlamaConfig.tiny(num_heads=5, num_kv_heads=2)
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.tiny(rope_scaling={"rope_type": "yarn"})


@pytest.mark.gpu
def test_cuda_cached_forward_equals_dense():
    model = Llama.random(LlamaConfig.tiny(), seed=1).cuda()
    tokens = torch.randint(0, 97, (29,), device="cuda")
    cache = ContiguousKVCache(model.config, max_len=32, device="cuda")
    with torch.no_grad():
        pieces = [model(tokens[a:b], cache.positions(b - a, "cuda"), cache.attend) for a, b in [(0, 20), (20, 21), (21, 29)]]
        dense = model.forward_dense(tokens[None])[0]
    assert_close(torch.cat(pieces), dense, name="cached logits on cuda")


@pytest.mark.gpu
def test_cuda_bf16_weights_give_fp32_logits():
    model = Llama.random(LlamaConfig.tiny(), seed=1).to("cuda", torch.bfloat16)
    logits = model.forward_dense(torch.randint(0, 97, (2, 11), device="cuda"))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_low_precision_cast_keeps_rope_frequencies_fp32():
    """model.to(bfloat16) must not round inv_freq: at position 1000 that would move angles by whole radians."""
    model = Llama.random(LlamaConfig.tiny(head_dim=32), seed=1).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, rope_inverse_frequencies(model.config))
    cos, _ = model.rope(torch.tensor([1000]))
    assert_close(cos[0, :16], torch.cos(1000 * rope_inverse_frequencies(model.config)), name="cos at 1000")
