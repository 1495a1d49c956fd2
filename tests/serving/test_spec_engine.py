"""Batched speculative decoding in the engine: greedy == target-only generate(), token for token, for any
drafter and k, with random arrivals, chunked prefill, shared prefixes and preemption; no leaked blocks;
seeded sampling is deterministic. (Distribution tests of the rule itself: test_speculative.py.)"""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys_ref.backend import default_device
from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
from mlsys_ref.serving.generate import generate
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams
from mlsys_ref.serving.spec_engine import SpeculativeConfig, SpeculativeEngine

from engine_helpers import assert_no_leak as assert_blocks_released
from engine_helpers import run_with_arrivals

MAX_EXAMPLES = min(settings().max_examples, 4)  # each example runs a whole engine on the CPU


@pytest.fixture(scope="module")
def models():
    # fp64 with the PyTorch reference attention: no argmax near-tie can flip between the packed
    # batched forward and generate()'s one-sequence forward (the Triton path is checked in fp32 below)
    # on the kernels' device: the engine writes its paged cache with the Triton write_kv kernel
    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3).double().to(default_device())
    small = Llama.random(LlamaConfig.tiny(num_layers=1), seed=1, std=0.3).double().to(default_device())
    return target, small


def make_drafter(kind, target, small):
    if kind == "ngram":
        return NGramDrafter(97, max_ngram=3)
    if kind == "random-model":
        return ModelDrafter(small)
    return ModelDrafter(target, num_layers=1)  # truncated self-draft


def assert_no_leak(engine):
    """No leaked blocks (engine_helpers) and no drafter state left behind."""
    assert_blocks_released(engine)
    assert not engine.drafters


def workload(rng, n):
    """Prompts with repeats (so n-gram lookup hits sometimes) and a shared prefix (prefix caching)."""
    shared = [rng.randrange(97) for _ in range(rng.randrange(3, 12))]
    prompts = []
    for _ in range(n):
        body = [rng.randrange(97) for _ in range(rng.randrange(1, 9))]
        prompts.append(shared[: rng.randrange(0, len(shared) + 1)] + body * rng.randrange(1, 3))
    return prompts


@settings(max_examples=MAX_EXAMPLES)
@given(st.data())
def test_greedy_batched_matches_target_only(models, data):
    target, small = models
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    kind = data.draw(st.sampled_from(["ngram", "random-model", "self-draft"]), label="drafter")
    k = data.draw(st.integers(1, 8), label="k")
    n = data.draw(st.integers(2, 5), label="requests")
    prompts = workload(rng, n)
    params = [SamplingParams(max_tokens=rng.randrange(1, 14), ignore_eos=rng.random() < 0.7) for _ in range(n)]
    arrivals = sorted(rng.randrange(0, 6) for _ in range(n))
    engine = SpeculativeEngine(target, SpeculativeConfig(make_drafter(kind, target, small), k), num_blocks=40,
                               block_size=4, max_num_seqs=3, max_num_batched_tokens=rng.choice([8, 64]),
                               attention="reference")
    streamed, ids = run_with_arrivals(engine, prompts, params, arrivals)
    for rid, i in ids.items():
        stops = [] if params[i].ignore_eos else [target.config.eos_token_id]
        expected = generate(target, prompts[i], params[i].max_tokens, stop_token_ids=stops)
        assert engine.output(rid).output_ids == expected == streamed[i], (kind, k, i)
    assert_no_leak(engine)


@pytest.mark.parametrize("kind,k", [("ngram", 1), ("random-model", 8), ("self-draft", 4)])
def test_preemption_and_few_blocks(models, kind, k):
    """So few blocks that drafts do not always get a slot and requests are preempted: still exact."""
    target, small = models
    rng = random.Random(k)
    prompts = workload(rng, 4)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = SpeculativeEngine(target, SpeculativeConfig(make_drafter(kind, target, small), k), num_blocks=9,
                               block_size=4, max_num_seqs=4, max_num_batched_tokens=16, attention="reference")
    outputs = engine.generate(prompts, params, progress=False)
    for prompt, out in zip(prompts, outputs):
        assert out.output_ids == generate(target, prompt, 12, stop_token_ids=[])
    assert engine.stats.emitted == 4 * 12  # every token, the first included, comes out of a verify step
    assert sum(o.num_preemptions for o in outputs) > 0
    assert_no_leak(engine)


def test_emulated_verify_graphs_and_triton_path():
    """Fixed-shape verify steps (padded to k rows, the CUDA-graph buffers run eagerly) through the Triton
    varlen paged attention (interpreter), fp32: same tokens as generate()."""
    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3).to(default_device())
    prompts = [[5, 17, 42, 3, 88, 5, 17], [9, 9, 8, 9, 9, 8, 9], [60, 61, 62]]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    engine = SpeculativeEngine(target, SpeculativeConfig(ModelDrafter(target, 1), k=3), num_blocks=16, block_size=8,
                               max_num_seqs=3, max_num_batched_tokens=32, cuda_graph_batch_sizes=[1, 2, 4],
                               emulate_graphs=True)
    outputs = engine.generate(prompts, params, progress=False)
    for prompt, out in zip(prompts, outputs):
        assert out.output_ids == generate(target, prompt, 7, stop_token_ids=[])
    assert_no_leak(engine)


def test_sampled_seeded_is_deterministic(models):
    target, small = models
    prompts = [[5, 17, 42, 3, 88, 5, 17], [9, 9, 8, 9, 9, 8], [60, 61, 62, 60]]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2, 3)]
    params[1] = SamplingParams(max_tokens=10, ignore_eos=True)  # a greedy request in the same batch
    runs = []
    for _ in range(2):
        for drafter in (NGramDrafter(97), ModelDrafter(small)):
            engine = SpeculativeEngine(target, SpeculativeConfig(drafter, k=3), num_blocks=20, block_size=4,
                                       max_num_seqs=3, attention="reference")
            outputs = engine.generate(prompts, params, progress=False)
            assert all(len(o.output_ids) == 10 for o in outputs)
            assert outputs[1].output_ids == generate(target, prompts[1], 10, stop_token_ids=[])
            runs.append([o.output_ids for o in outputs])
            assert_no_leak(engine)
    assert runs[0] == runs[2] and runs[1] == runs[3]


def test_bad_input_raises(models):
    target, _ = models
    with pytest.raises(ValueError, match="k must be"):
        SpeculativeConfig(NGramDrafter(97), k=0)
    with pytest.raises(TypeError, match="drafter"):
        SpeculativeConfig(object(), k=2)
    with pytest.raises(ValueError, match="vocab"):
        SpeculativeEngine(target, SpeculativeConfig(NGramDrafter(50), 2), num_blocks=4, attention="reference")
    with pytest.raises(TypeError, match="SpeculativeConfig"):
        SpeculativeEngine(target, NGramDrafter(97), num_blocks=4)
    engine = SpeculativeEngine(target, SpeculativeConfig(NGramDrafter(97), 2), num_blocks=8, attention="reference")
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request([1, 2, 3], SamplingParams(temperature=1.0, top_k=5))


@pytest.mark.gpu
def test_cuda_graph_verify_matches_generate():
    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3).cuda()
    prompts = [[5, 17, 42, 3, 88, 5, 17, 42], [9, 9, 8, 9, 9, 8, 9], [60, 61, 62], [1, 2, 3, 1, 2]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    engine = SpeculativeEngine(target, SpeculativeConfig(NGramDrafter(97), k=4), num_blocks=32, block_size=16,
                               max_num_seqs=4, cuda_graph_batch_sizes=[1, 2, 4])
    outputs = engine.generate(prompts, params, progress=False)
    for prompt, out in zip(prompts, outputs):
        assert out.output_ids == generate(target, prompt, 16, stop_token_ids=[])
    assert_no_leak(engine)
