"""quantize_model: every method on a tiny Llama, GPTQ is sequential, validation first, save/load exact."""

import pytest
import torch
from torch import nn

from mlsys_ref.quant.gptq import HessianAccumulator, gptq_quantize
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.llm_int8 import Int8Linear
from mlsys_ref.quant.model import linear_weight_bytes, load_quantized, quantize_model, save_quantized
from mlsys_ref.serving.model import Llama, LlamaConfig

CONFIG = LlamaConfig.tiny()  # hidden 48, intermediate 80, tied embeddings


def _tokens():
    return torch.randint(0, CONFIG.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))


def _run(model):
    return model.forward_dense(_tokens())


@pytest.mark.parametrize("method,bits,group,kwargs", [
    ("rtn", 4, 16, {}), ("rtn", 3, None, {"symmetric": True}), ("gptq", 4, 16, {"act_order": True}),
    ("gptq", 8, None, {"symmetric": True}), ("llm_int8", 8, None, {}), ("smoothquant", None, None, {}),
])
def test_methods_swap_every_linear_and_round_trip(tmp_path, method, bits, group, kwargs):
    reference = _run(Llama.random(CONFIG))
    model = quantize_model(Llama.random(CONFIG), method, bits, group, _run, **kwargs)
    kind = QuantizedLinear if method in ("rtn", "gptq") else Int8Linear
    swapped = [m for m in model.modules() if isinstance(m, kind)]
    assert len(swapped) == 7 * CONFIG.num_layers
    assert isinstance(model.lm_head, nn.Linear)  # tied to the embedding: left alone
    logits = _run(model)
    assert torch.isfinite(logits).all()
    error = (logits - reference).abs().mean() / reference.abs().mean()
    assert error < {3: 1.0, 4: 0.5}.get(bits, 0.1)  # a sanity bound on random weights; quality is measured on SmolLM2
    save_quantized(model, str(tmp_path / "q.safetensors"))
    loaded = load_quantized(Llama.random(CONFIG, seed=7), str(tmp_path / "q.safetensors"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert torch.equal(_run(loaded), logits)
    assert linear_weight_bytes(model) < linear_weight_bytes(Llama.random(CONFIG))


def test_gptq_is_sequential():
    """The second layer's Hessian comes from the *quantized* first layer's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(200, 32) @ torch.randn(32, 32)
    W1, W2, b1 = model[0].weight.detach().clone(), model[2].weight.detach().clone(), model[0].bias.detach().clone()
    quantize_model(model, "gptq", 4, 16, x, skip=())
    acc = HessianAccumulator(32)
    acc.add(x)
    first = gptq_quantize(W1, acc.H, 4, 16)
    acc2 = HessianAccumulator(48)
    acc2.add(torch.relu(x @ first.dequantize().T + b1))
    second = gptq_quantize(W2, acc2.H, 4, 16)
    assert torch.equal(model[0].codes(), first.q)
    assert torch.equal(model[2].codes(), second.q)


def _unchanged(model, snapshot):
    return all(torch.equal(a, snapshot[k]) for k, a in model.state_dict().items()) and \
        not any(isinstance(m, (QuantizedLinear, Int8Linear)) for m in model.modules())


@pytest.mark.parametrize("call,match", [
    (dict(method="awq", bits=4), "method"),
    (dict(method="rtn", bits=9), "bits"),
    (dict(method="llm_int8", bits=4), "int8 only"),
    (dict(method="rtn", bits=4, group_size=32), "does not divide in_features=48"),
    (dict(method="gptq", bits=4), "calibration"),
    (dict(method="smoothquant", calibration=torch.full((2, 48), float("nan"))), "NaN or inf"),
    (dict(method="gptq", bits=4, calibration=lambda m: m.layers[0].mlp.down_proj(torch.full((1, 80), float("inf")))),
     "NaN or inf"),
])
def test_bad_input_raises_before_any_change(call, match):
    model = Llama.random(CONFIG)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_model(model, **call)
    assert _unchanged(model, snapshot)


def test_nan_weight_raises_before_any_change():
    model = Llama.random(CONFIG)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj"):
        quantize_model(model, "rtn", 4)
    assert all(torch.equal(a, snapshot[k]) or torch.isnan(a).any() for k, a in model.state_dict().items())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
