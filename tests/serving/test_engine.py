"""Engine: continuous batching over the paged cache gives, token for token, what each request gets alone
through the reference ``generate()`` -- with random arrivals, chunked prefills, shared prefixes and
preemption -- and leaks no block. Plus sampling seeds, aborts, bad requests and streaming."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys_ref.backend import default_device
from mlsys_ref.serving.engine import Engine
from mlsys_ref.serving.generate import generate
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams

from engine_helpers import assert_no_leak, run_with_arrivals

# the Triton interpreter is slow: a handful of examples whatever the profile
MAX_EXAMPLES = min(settings().max_examples, 6)


@pytest.fixture(scope="module")
def model():
    return Llama.random(LlamaConfig.tiny(), seed=3).to(default_device())


def reference(model, prompt, params):
    stops = list(params.stop_token_ids) + ([] if params.ignore_eos else [model.config.eos_token_id])
    return generate(model, prompt, params.max_tokens, stop_token_ids=stops)


@settings(max_examples=MAX_EXAMPLES)
@given(st.data())
def test_concurrent_greedy_matches_reference(model, data):
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    prefixes = [[rng.randrange(97) for _ in range(rng.randrange(4, 20))] for _ in range(2)]
    n = data.draw(st.integers(2, 6), label="requests")
    prompts = [rng.choice(prefixes)[: rng.randrange(0, 20)] + [rng.randrange(97) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 9)) for _ in range(n)]
    arrivals = [rng.randrange(0, 5) for _ in range(n)]
    block_size = data.draw(st.sampled_from([8, 16]), label="block_size")
    largest = max(-(-(len(p) + sp.max_tokens) // block_size) for p, sp in zip(prompts, params))
    num_blocks = data.draw(st.integers(largest, 3 * largest + 4), label="num_blocks")
    engine = Engine(model, num_blocks=num_blocks, block_size=block_size,
                    max_num_seqs=data.draw(st.integers(1, 4), label="max_num_seqs"),
                    max_num_batched_tokens=data.draw(st.integers(4, 32), label="token_budget"))
    streamed, ids = run_with_arrivals(engine, prompts, params, arrivals)
    for request_id, i in ids.items():
        expected = reference(model, prompts[i], params[i])
        assert engine.output(request_id).output_ids == expected == streamed[i], f"request {i}"
    assert_no_leak(engine)


@pytest.mark.parametrize("graphs", [False, True])
def test_preemption_and_prefix_sharing_keep_outputs(model, graphs):
    shared = [(5 * j + 1) % 97 for j in range(19)]
    prompts = [shared + [40 + i] * (1 + i) for i in range(4)] + [shared[:9] + [3, 4]]
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * len(prompts)
    engine = Engine(model, num_blocks=9, block_size=8, max_num_seqs=4, max_num_batched_tokens=24)
    if graphs:  # the graph paths (run eagerly): persistent block tables rewritten after preemption and CoW
        engine.runner.capture_decode_graphs([2, 4], max_blocks_per_seq=5, emulate=True)
        engine.runner.capture_mixed_graphs([16, 24], max_num_seqs=4, max_blocks_per_seq=5, emulate=True)
    outputs = engine.generate(prompts, params, progress=False)
    assert sum(o.num_preemptions for o in outputs) > 0, "9 blocks of 8 slots must force preemption"
    assert sum(o.num_cached_prompt_tokens for o in outputs) > 0, "the shared 19-token prefix must hit the cache"
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.output_ids == reference(model, prompt, p) and out.finish_reason == "length"
    assert_no_leak(engine)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234, max_tokens=8, ignore_eos=True)
    prompt = [11, 22, 33, 44, 55, 66, 77]
    alone = Engine(model, num_blocks=8, block_size=8).generate([prompt], target, progress=False)[0].output_ids
    others = [[1, 2, 3] * 4, [9] * 13, [50, 60]]
    mixed = Engine(model, num_blocks=6, block_size=8, max_num_seqs=3, max_num_batched_tokens=12)
    params = [SamplingParams(temperature=1.1, seed=7, max_tokens=9, ignore_eos=True), target,
              SamplingParams(max_tokens=5), SamplingParams(temperature=0.6, max_tokens=11, ignore_eos=True)]
    outputs = mixed.generate([others[0], prompt, others[1], others[2]], params, progress=False)
    assert outputs[1].output_ids == alone
    assert_no_leak(mixed)


def test_abort_frees_blocks_and_is_reported(model):
    engine = Engine(model, num_blocks=16, block_size=8, max_num_seqs=4)
    keep = engine.add_request([3, 1, 4, 1, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    victim = engine.add_request(list(range(10, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    queued = engine.add_request([7, 7, 7], SamplingParams(max_tokens=50))
    engine.step()
    used = engine.block_manager.stats()["used_blocks"]
    assert engine.abort(victim) and engine.abort(queued)
    assert engine.block_manager.stats()["used_blocks"] < used
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in finished, "a request finished twice"
            if out.finished:
                finished[out.request_id] = out.token_ids
    assert set(finished) == {keep, victim, queued} and finished[victim] == [] and finished[queued] == []
    assert engine.output(victim).finish_reason == "abort" and not engine.abort(victim)
    assert engine.output(keep).output_ids == reference(model, [3, 1, 4, 1, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    assert_no_leak(engine)


def test_bad_requests_are_rejected_and_others_continue(model):
    engine = Engine(model, num_blocks=6, block_size=8)
    context = model.config.max_position_embeddings
    bad = [([], SamplingParams()), ([1] * context, SamplingParams()), ([1, 500], SamplingParams()),
           ([1, 2], "greedy"), ([1] * 30, SamplingParams(max_tokens=40)), ("text without a tokenizer", SamplingParams())]
    for prompt, params in bad:
        with pytest.raises((ValueError, TypeError)):
            engine.add_request(prompt, params)
    good = [[4, 5, 6], [8] * 9]
    prompts = [bad[0][0], good[0], bad[1][0], good[1], bad[4][0]]
    params = [SamplingParams(max_tokens=4)] * 4 + [SamplingParams(max_tokens=40)]
    outputs = engine.generate(prompts, params, progress=False)
    assert [o.finish_reason == "rejected" for o in outputs] == [True, False, True, False, True]
    assert "empty" in outputs[0].error and "context" in outputs[2].error and "blocks" in outputs[4].error
    assert outputs[1].output_ids == reference(model, good[0], params[1])
    assert outputs[3].output_ids == reference(model, good[1], params[3])
    assert_no_leak(engine)


def test_stop_tokens_and_string_prompts(model):
    class ToyTokenizer:
        def encode(self, text):
            return [ord(c) % 97 for c in text]

        def decode(self, ids):
            return " ".join(map(str, ids))

    prompt = "paged attention"
    ids = ToyTokenizer().encode(prompt)
    free_run = reference(model, ids, SamplingParams(max_tokens=12, ignore_eos=True))
    stop = free_run[5]
    engine = Engine(model, num_blocks=8, block_size=8, tokenizer=ToyTokenizer())
    out = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=[stop], ignore_eos=True), progress=False)[0]
    assert out.output_ids == free_run[: free_run.index(stop) + 1] and out.finish_reason == "stop"
    assert out.text == ToyTokenizer().decode(out.output_ids)


def test_max_model_len_caps_generation(model):
    engine = Engine(model, num_blocks=8, block_size=8, max_model_len=12)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(3, 15)), SamplingParams())
    out = engine.generate([list(range(3, 12))], SamplingParams(max_tokens=10, ignore_eos=True), progress=False)[0]
    assert out.finish_reason == "length" and len(out.output_ids) == 3
    assert out.output_ids == reference(model, list(range(3, 12)), SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError):
        Engine(model, max_model_len=model.config.max_position_embeddings + 1)


def test_decode_graph_buffers_and_padding(model):
    """The CUDA-graph decode path (static buffers, batch padded to a captured size), run eagerly."""
    engine = Engine(model, num_blocks=20, block_size=8, max_num_seqs=3, max_num_batched_tokens=16)
    engine.runner.capture_decode_graphs([1, 2, 4], max_blocks_per_seq=8, emulate=True)
    used = []
    run = engine.runner.graphs.run
    engine.runner.graphs.run = lambda chunks, bm: used.append(len(chunks)) or run(chunks, bm)
    prompts = [[5, 6, 7], [1] * 11, [9, 8, 7, 6] * 5]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params, progress=False)):
        assert out.output_ids == reference(model, prompt, params)
    assert 3 in used and 1 in used  # batch 3 ran padded to 4
    assert_no_leak(engine)


def test_persistent_block_tables_rows_and_reclaim():
    from types import SimpleNamespace

    from mlsys_ref.serving.cuda_graphs import PersistentBlockTables

    tables = {0: [3, 1], 1: [7], 2: [2, 5, 6]}
    manager = SimpleNamespace(block_table=lambda seq_id: list(tables[seq_id]))
    chunks = lambda ids: [SimpleNamespace(seq=SimpleNamespace(seq_id=i)) for i in ids]  # noqa: E731
    persistent = PersistentBlockTables(rows=3, width=4, device="cpu")
    rows = persistent.assign(chunks([0, 1]), manager)
    assert persistent.device[rows[0], :2].tolist() == [3, 1] and persistent.device[rows[1], :1].tolist() == [7]
    tables[1] = [7, 4]  # a new block: only that row changes
    assert persistent.assign(chunks([0, 1]), manager) == rows and persistent.device[rows[1], :2].tolist() == [7, 4]
    tables[3] = [9]
    rows_2 = persistent.assign(chunks([2, 3]), manager)  # 3 rows, 4 sequences: the rows of 0 and 1 are reused
    assert persistent.device[rows_2[0], :3].tolist() == [2, 5, 6] and persistent.device[rows_2[1], :1].tolist() == [9]
    assert set(persistent.row_of) == {2, 3}


def test_mixed_graph_buffers_and_padding(model):
    """The CUDA-graph path for steps with prefill chunks (T padded to a captured size, unused sequence rows
    with q_len 0, logits rows padded), run eagerly, together with the decode graphs."""
    engine = Engine(model, num_blocks=24, block_size=8, max_num_seqs=3, max_num_batched_tokens=16)
    engine.runner.capture_decode_graphs([1, 2, 4], max_blocks_per_seq=8, emulate=True)
    engine.runner.capture_mixed_graphs([8, 16], max_num_seqs=3, max_blocks_per_seq=8, emulate=True)
    used = []
    run = engine.runner.mixed_graphs.run
    engine.runner.mixed_graphs.run = lambda chunks, bm: used.append(sum(c.end - c.start for c in chunks)) or run(chunks, bm)
    prompts = [[5, 6, 7], [1] * 11, [9, 8, 7, 6] * 5, [3, 1, 4, 1, 5]]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (6, 3, 5, 4)]
    streamed, ids = run_with_arrivals(engine, prompts, params, [0, 0, 1, 3])
    for request_id, i in ids.items():
        assert engine.output(request_id).output_ids == reference(model, prompts[i], params[i]) == streamed[i]
    assert any(t < 8 for t in used) and any(8 < t < 16 for t in used)  # padded to both sizes
    assert_no_leak(engine)
    with pytest.raises(ValueError, match="token_sizes"):
        engine.runner.capture_mixed_graphs([], max_num_seqs=3, max_blocks_per_seq=8, emulate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_with_cuda_graphs_matches_reference(compile_decode):
    model = Llama.random(LlamaConfig.tiny(), seed=3).cuda()
    prompts = [[(3 * i + j) % 97 for j in range(5 + 7 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    engine = Engine(model, num_blocks=64, block_size=16, max_num_seqs=4, cuda_graph_batch_sizes=[1, 2, 4],
                    cuda_graph_token_sizes=[16, 64], max_num_batched_tokens=64, compile_decode=compile_decode)
    assert engine.runner.graphs is not None and engine.runner.mixed_graphs is not None
    for prompt, out in zip(prompts, engine.generate(prompts, params, progress=False)):
        assert out.output_ids == reference(model, prompt, params)
    assert_no_leak(engine)


@pytest.mark.gpu
def test_engine_on_gpu_matches_reference_bf16_runs():
    model = Llama.random(LlamaConfig.tiny(), seed=3).cuda()
    prompts = [[(3 * i + j) % 97 for j in range(5 + 7 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = Engine(model, num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=32)
    outputs = engine.generate(prompts, params, progress=False)
    for prompt, out in zip(prompts, outputs):
        assert out.output_ids == reference(model, prompt, params)
    assert_no_leak(engine)
    half = Engine(model.to(torch.bfloat16), num_blocks=64, block_size=16)
    assert all(len(o.output_ids) == 12 for o in half.generate(prompts, params, progress=False))
    assert_no_leak(half)
