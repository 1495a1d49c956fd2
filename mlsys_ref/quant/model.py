"""quantize_model: swap a model's nn.Linear layers for quantized ones; save and load the result.

Methods: ``rtn`` (round to nearest), ``gptq`` (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1
applied layer after layer, §4 "sequential"), ``llm_int8`` (Dettmers et al. 2022, arXiv:2208.07339
§3), ``smoothquant`` (Xiao et al. 2023, arXiv:2211.10438 §4, then W8A8).

GPTQ's layer-by-layer order comes from one calibration forward pass: a pre-hook on each target
linear accumulates H = 2XXᵀ from the input it *actually receives*, quantizes the layer on the
spot, and lets the forward continue with the quantized weight. So every layer sees the outputs of
the already-quantized layers before it (q, k and v share one input; o sees quantized q/k/v...), and
the pass stops right after the last target layer (no LM head over the calibration batch).

All validation happens before any layer changes: method, bits, group size against every target
layer's in_features, NaN/inf in weights. The calibration pass works on shadow weights and the
model is restored if it fails (e.g. NaN in the calibration activations), so an error leaves the
model as it was.

Left out: multi-batch calibration for GPTQ (it needs the whole calibration batch in one forward;
the paper's code caches block inputs instead), quantizing tied weights (a linear sharing its
weight with an embedding is skipped: quantizing it would change the embedding too).

The one idea to notice: "sequential" costs nothing extra when the hooks run inside the forward.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from mlsys_ref.quant.gptq import HessianAccumulator, GPTQResult, gptq_quantize
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.llm_int8 import Int8Linear
from mlsys_ref.quant.smoothquant import collect_input_absmax, llama_smooth_pairs, smooth_model

__all__ = ["METHODS", "quantize_model", "target_linears", "save_quantized", "load_quantized", "linear_weight_bytes"]

METHODS = ("rtn", "gptq", "llm_int8", "smoothquant")
_MODULE_TYPES = {"QuantizedLinear": QuantizedLinear, "Int8Linear": Int8Linear}


class _StopForward(Exception):
    """Raised by the last GPTQ hook: nothing after the last target layer needs computing."""


def target_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The nn.Linear modules to quantize, in registration order: not named in ``skip``, weight not tied."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip and name not in skip
            and counts[id(m.weight)] == 1}


def _run(calibration) -> Callable[[nn.Module], object]:
    if callable(calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.is_floating_point() and not torch.isfinite(calibration).all():
            raise ValueError("calibration data holds NaN or inf")
        return lambda model: model(calibration)
    raise TypeError("calibration must be a tensor (passed as model(calibration)) or a callable run(model)")


def _validate(model, method, bits, group_size, calibration, targets):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("llm_int8", "smoothquant"):
        if bits not in (None, 8):
            raise ValueError(f"method {method!r} is int8 only: bits must be 8, got {bits!r}")
        if group_size is not None:
            raise ValueError(f"method {method!r} uses per-channel weight scales: group_size must be None")
    elif not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"method {method!r} supports bits in [2, 8], got {bits!r}")
    if method in ("gptq", "smoothquant") and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if not targets:
        raise ValueError("the model has no nn.Linear layer to quantize")
    for name, linear in targets.items():
        K = linear.in_features
        if group_size is not None and group_size != -1 and (not isinstance(group_size, int) or group_size <= 0 or K % group_size):
            raise ValueError(f"group_size={group_size!r} does not divide in_features={K} of layer {name!r}")
        if bits == 4 and method in ("rtn", "gptq") and K % 2:
            raise ValueError(f"int4 packs two codes per byte: layer {name!r} has odd in_features={K}")
        if not torch.isfinite(linear.weight).all() or (linear.bias is not None and not torch.isfinite(linear.bias).all()):
            raise ValueError(f"layer {name!r} holds NaN or inf in its weight or bias")
    return _run(calibration) if calibration is not None else None


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def _gptq_pass(model, targets, run, bits, group_size, symmetric, act_order, static_groups, blocksize, percdamp):
    """One calibration forward with a quantize-on-arrival hook per layer; returns name -> GPTQResult."""
    results: dict[str, GPTQResult] = {}
    originals = {name: linear.weight.data for name, linear in targets.items()}
    last = list(targets)[-1]
    shared = {}  # q/k/v (and gate/up) get the very same input tensor: one H for all of them

    def hook(name):
        def quantize_here(linear, args):
            if name in results:
                raise RuntimeError(f"layer {name!r} ran twice in one forward; GPTQ needs one input per layer")
            if shared.get("x") is not args[0]:
                acc = HessianAccumulator(linear.in_features, device=linear.weight.device)
                acc.add(args[0])
                shared.update(x=args[0], H=acc.H)
            result = gptq_quantize(linear.weight.float(), shared["H"], bits, group_size, symmetric, act_order,
                                   static_groups, blocksize, percdamp)
            results[name] = result
            linear.weight.data = result.dequantize().to(linear.weight.dtype)  # later layers see Ŵ's output
            if name == last:
                raise _StopForward
        return quantize_here

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in targets.items()]
    try:
        run(model)
    except _StopForward:
        pass
    finally:
        shared.clear()
        for handle in handles:
            handle.remove()
        for name, linear in targets.items():
            linear.weight.data = originals[name]  # the swap below replaces the module anyway
    missing = [name for name in targets if name not in results]
    if missing:
        raise ValueError(f"the calibration run never reached layers {missing[:3]}... ({len(missing)} in all)")
    return results


def quantize_model(model: nn.Module, method: str, bits: int | None = None, group_size: int | None = None,
                   calibration: torch.Tensor | Callable[[nn.Module], object] | None = None, *,
                   symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                   blocksize: int = 128, percdamp: float = 0.01, threshold: float = 6.0, alpha: float = 0.5,
                   integer_zero: bool = True, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Quantize ``model`` in place and return it. ``calibration``: token ids (model(calibration)) or
    ``run(model)``; needed by gptq and smoothquant. group_size None: per output channel.
    ``integer_zero=False`` (rtn only): a fractional zero point, the Q4_1 grid (see quant_params)."""
    targets = target_linears(model, skip)
    run = _validate(model, method, bits, group_size, calibration, targets)
    group = None if group_size == -1 else group_size
    if not integer_zero and (method != "rtn" or symmetric):
        raise ValueError("integer_zero=False is supported for method 'rtn' with symmetric=False only")
    if method == "rtn":
        new = {name: QuantizedLinear.from_linear(l, bits, group, symmetric, integer_zero=integer_zero)
               for name, l in targets.items()}
    elif method == "gptq":
        results = _gptq_pass(model, targets, run, bits, group, symmetric, act_order, static_groups, blocksize, percdamp)
        new = {name: results[name].to_linear(bits, targets[name].bias) for name in targets}
    elif method == "llm_int8":
        new = {name: Int8Linear.from_linear(l, threshold) for name, l in targets.items()}
    else:
        pairs = [(p, c) for p, c in llama_smooth_pairs(model) if all(n in targets for n in c)]
        stats = collect_input_absmax(model, [c[0] for _, c in pairs], run)  # raises before any change
        smooth_model(model, pairs, stats, alpha)
        new = {name: Int8Linear.from_linear(l, threshold=None) for name, l in targets.items()}
    for name, module in new.items():
        _swap(model, name, module)
    return model


def linear_weight_bytes(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), fp_bytes: int = 2) -> int:
    """Bytes of every (quantized or not) linear weight, fp ones counted at ``fp_bytes`` per element."""
    total, fp_linears = 0, target_linears(model, skip)
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, Int8Linear)):
            total += module.weight_bytes()
        elif name in fp_linears:
            total += module.weight.numel() * fp_bytes
    return total


def save_quantized(model: nn.Module, path: str) -> None:
    """All tensors (packed codes, scales, everything else) to safetensors; module configs in its metadata."""
    from safetensors.torch import save_model

    layers = {name: {"type": type(m).__name__, "config": m.config()}
              for name, m in model.named_modules() if type(m).__name__ in _MODULE_TYPES}
    save_model(model, path, metadata={"mlsys_ref.quant": json.dumps(layers)})


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Into an unquantized model of the same architecture: swap in the saved modules, then load every tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "mlsys_ref.quant" not in metadata:
        raise ValueError(f"{path} was not written by save_quantized (no 'mlsys_ref.quant' metadata)")
    for name, entry in json.loads(metadata["mlsys_ref.quant"]).items():
        _swap(model, name, _MODULE_TYPES[entry["type"]].from_config(entry["config"]))
    load_model(model, path, strict=True)
    return model


if __name__ == "__main__":
    import tempfile

    from mlsys_ref.serving.model import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig.tiny()
    tokens = torch.randint(0, config.vocab_size, (4, 33))
    reference = Llama.random(config).forward_dense(tokens)
    for method, bits, group in (("rtn", 4, 16), ("gptq", 4, 16), ("gptq", 3, None), ("llm_int8", 8, None), ("smoothquant", 8, None)):
        model = quantize_model(Llama.random(config), method, bits, group, lambda m: m.forward_dense(tokens))
        logits = model.forward_dense(tokens)
        with tempfile.TemporaryDirectory() as folder:
            save_quantized(model, f"{folder}/q.safetensors")
            loaded = load_quantized(Llama.random(config, seed=1), f"{folder}/q.safetensors")
        print(f"{method:11s} int{bits} g{group}: logits error vs fp {(logits - reference).abs().max():.3f}; "
              f"save/load exact: {torch.equal(loaded.forward_dense(tokens), logits)}")
