"""The serving engine: requests in, streamed tokens out, continuous batching over a paged KV cache.

Papers: Orca (Yu et al. 2022, OSDI, §3-4: iteration-level scheduling, selective batching),
vLLM (Kwon et al. 2023, arXiv 2309.06180, §4-5: PagedAttention, block manager, the engine loop),
Sarathi-Serve (Agrawal et al. 2024, arXiv 2403.02310, §4: chunked prefills, stall-free batches).
The structure follows nano-vllm: ``Engine`` = ``Scheduler`` (who runs) + ``BlockManager`` (where
their K/V lives) + ``ModelRunner`` (one packed forward) + the sampler.

The one idea to notice: ``step()`` is the whole engine -- schedule, copy-on-write copies, one
forward, sample, mark the computed blocks (so prefix caching may share them), advance. Everything
else (``generate``, streaming, aborts, preemption) is bookkeeping around that loop, and the step log
(``Engine.step_log``) shows which request ran which tokens in which step.

Errors: ``add_request`` raises ``ValueError``/``TypeError`` for an invalid request (empty prompt,
a prompt that leaves no room in the model's context, a request that can never fit in the KV cache,
token ids outside the vocabulary, params that are not ``SamplingParams``); the engine is unchanged
and keeps serving the others. ``generate`` catches those per prompt and reports the request as
``finish_reason="rejected"`` with the error text. Every accepted request ends with ``finish_reason``
"stop", "length" or "abort"; an aborted request is streamed once as ``(id, [], True)``.

Left out: an HTTP server, async I/O, detokenizing streams, logprobs, parallel sampling (n > 1),
LoRA, multi-GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mlsys_ref.serving.kv_cache import BlockManager
from mlsys_ref.serving.model_runner import ModelRunner
from mlsys_ref.serving.sampling import SamplingParams, make_generator, sample
from mlsys_ref.serving.scheduler import Scheduler, Sequence, Status

__all__ = ["Engine", "StepOutput", "RequestOutput", "StepRecord"]


class StepOutput(NamedTuple):
    request_id: int
    token_ids: list[int]  # tokens produced for this request in this step (0 or 1)
    finished: bool


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop", "length", "abort" or "rejected"
    text: str | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0


@dataclass
class StepRecord:
    """What one step did: (request id, start, end, "prefill"|"decode") per chunk, and who was preempted."""

    step: int
    chunks: list[tuple[int, int, int, str]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    num_tokens: int = 0
    used_blocks: int = 0


class Engine:
    """``Engine(model, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, enable_prefix_caching)``.

    ``max_model_len`` caps a sequence's length (default: the model's context). ``num_blocks`` defaults to
    enough for ``max_num_seqs`` sequences of ``max_model_len`` tokens. ``attention="reference"``
    uses the PyTorch gather-then-attend reference instead of the Triton kernels (to check them).
    ``cuda_graph_batch_sizes`` (CUDA only), e.g. ``[1, 2, 4, 8]``, captures pure-decode steps as graphs;
    ``cuda_graph_token_sizes``, e.g. ``[64, 128, 256, 512]``, captures steps with prefill chunks (any mix of up
    to ``max_num_seqs`` sequences, T padded to a listed size); ``compile_decode=True`` also ``torch.compile``s
    the layer code around the attention kernels first (every path).
    """

    def __init__(self, model, num_blocks: int | None = None, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True, tokenizer=None,
                 max_model_len: int | None = None, attention: str = "triton", cuda_graph_batch_sizes=None,
                 cuda_graph_token_sizes=None, compile_decode: bool = False, verbose: bool = False):
        config = model.config
        if max_model_len is None:
            max_model_len = config.max_position_embeddings
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be an int in [2, {config.max_position_embeddings}], got {max_model_len!r}")
        self.max_model_len = max_model_len
        if num_blocks is None:
            num_blocks = max_num_seqs * -(-max_model_len // block_size)
        self.model, self.config, self.tokenizer, self.verbose = model, config, tokenizer, verbose
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, verbose)
        self.runner = ModelRunner(model, num_blocks, block_size, attention)
        self.device = self.runner.device
        max_blocks = -(-max_model_len // block_size)
        if cuda_graph_batch_sizes:  # decode steps of up to max(sizes) sequences replay a captured graph
            self.runner.capture_decode_graphs(cuda_graph_batch_sizes, max_blocks, compile=compile_decode)
        if cuda_graph_token_sizes:  # so do steps with prefill chunks of up to max(sizes) tokens
            self.runner.capture_mixed_graphs(cuda_graph_token_sizes, max_num_seqs, max_blocks, compile=compile_decode)
        self.requests: dict[int, Sequence] = {}
        self.times: dict[int, list[float | None]] = {}  # arrival, first token, finish
        self._next_id = 0
        self._aborted_unreported: list[int] = []
        self.step_log: list[StepRecord] = []

    # -- requests
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("prompt is a str but the engine has no tokenizer: pass token ids or Engine(tokenizer=...)")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError/TypeError (and queues nothing) if invalid."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        context, vocab = self.max_model_len, self.config.vocab_size
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        if len(ids) >= context:
            raise ValueError(f"prompt has {len(ids)} tokens; the context (max_model_len) is {context}, so at most {context - 1} leave room for a new token")
        bm = self.block_manager
        blocks_needed = -(-min(len(ids) + params.max_tokens, context) // bm.block_size)
        if blocks_needed > bm.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {blocks_needed} KV blocks, the cache has only {bm.num_blocks}")
        request_id, self._next_id = self._next_id, self._next_id + 1
        stops = set(params.stop_token_ids)
        if not params.ignore_eos and self.config.eos_token_id is not None:
            stops.add(self.config.eos_token_id)
        seq = Sequence(request_id, ids, params, make_generator(params, self.device), frozenset(stops), context)
        self.requests[request_id] = seq
        self.times[request_id] = [time.perf_counter(), None, None]
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: int) -> bool:
        """Stop a request now and free its blocks; False if it had already finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request_id {request_id}")
        if seq.status is Status.FINISHED:
            return False
        self.scheduler.abort(seq)
        self.times[request_id][2] = time.perf_counter()
        self._aborted_unreported.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted_unreported)

    # -- the loop
    def _schedule_step(self) -> tuple[list[StepOutput], object, StepRecord]:
        """Report aborts, schedule, log the step: the start of every step (speculative steps too)."""
        outputs = [StepOutput(rid, [], True) for rid in self._aborted_unreported]
        self._aborted_unreported = []
        batch = self.scheduler.schedule()
        record = StepRecord(len(self.step_log), preempted=list(batch.preempted), num_tokens=batch.num_tokens)
        self.step_log.append(record)
        if not batch.chunks and self.scheduler.has_unfinished() and not batch.preempted:
            raise RuntimeError("the scheduler made no progress with requests waiting (a bug: add_request should have rejected them)")
        return outputs, batch, record

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One iteration: schedule, forward, sample. Returns the tokens produced, per request."""
        outputs, batch, record = self._schedule_step()
        if not batch.chunks:
            return outputs
        record.chunks = [(c.seq.seq_id, c.start, c.end, "decode" if c.is_decode else "prefill") for c in batch.chunks]
        self.runner.copy_blocks(self.block_manager.copy_on_write_pending())
        logits = self.runner.execute(batch.chunks, self.block_manager)  # [R, vocab], still being computed
        # host work that needs no sampled token runs while the GPU computes (sample() is the step's one sync):
        # the K/V of these positions is being written (any reader is a later step on the same stream); only
        # full blocks are shared, so tell the block manager when one fills
        block_size = self.block_manager.block_size
        for chunk in batch.chunks:
            if chunk.end // block_size > chunk.start // block_size:
                self.block_manager.mark_computed(chunk.seq.seq_id, chunk.end)
        record.used_blocks = self.block_manager.num_blocks - len(self.block_manager.free_list) - len(self.block_manager.cached)
        sampling = [c.seq for c in batch.chunks if c.sample]
        tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        now = time.perf_counter()
        for seq, new, finished in self.scheduler.postprocess(batch, {s.seq_id: t for s, t in zip(sampling, tokens)}):
            times = self.times[seq.seq_id]
            times[1] = now if times[1] is None else times[1]
            times[2] = now if finished else None
            outputs.append(StepOutput(seq.seq_id, new, finished))
        return outputs

    def output(self, request_id: int) -> RequestOutput:
        seq = self.requests[request_id]
        arrival, first, finish = self.times[request_id]
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer is not None else None
        return RequestOutput(request_id, seq.token_ids[:seq.num_prompt_tokens], list(seq.output_ids),
                             seq.finish_reason or "running", text, None, arrival, first, finish,
                             seq.num_preemptions, seq.num_cached_at_admission)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion (all at once, continuous batching); outputs in prompt order.
        An invalid prompt does not stop the others: its output has finish_reason "rejected" and the error."""
        from tqdm.auto import tqdm

        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (each a str or a list of token ids)")
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        slots: list[int | RequestOutput] = []
        for prompt, p in zip(prompts, params_list):
            try:
                slots.append(self.add_request(prompt, p))
            except (ValueError, TypeError) as error:
                slots.append(RequestOutput(-1, [], [], "rejected", error=str(error)))
        pending = {s for s in slots if isinstance(s, int)}
        with tqdm(total=len(pending), desc="generate", unit="req", disable=not progress) as bar:
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        bar.update(1)
        return [self.output(s) if isinstance(s, int) else s for s in slots]


def static_batching(engine: Engine, prompts: list[list[int]], max_tokens: list[int], batch_size: int,
                    pad_id: int = 0, progress: bool = False) -> dict:
    """The baseline continuous batching replaces (Orca §2.2, FasterTransformer-style): requests run in
    fixed groups of ``batch_size`` in arrival order; each prompt is left-padded to its group's longest
    and every request decodes as many tokens as the group's longest output; the next group starts
    only when the whole group is done. Same engine, model and kernels -- only the batching differs.

    Returns steps, useful tokens (each request's own ``max_tokens``) and computed tokens. The padded
    outputs are not meaningful (no attention mask over the padding): this measures cost only.
    """
    if engine.has_unfinished():
        raise ValueError("static_batching needs an idle engine")
    if engine.block_manager.enable_prefix_caching:
        raise ValueError("static_batching needs Engine(enable_prefix_caching=False): shared padding would be cached")
    if engine.scheduler.max_num_seqs < batch_size:
        raise ValueError(f"the engine's max_num_seqs ({engine.scheduler.max_num_seqs}) < batch_size ({batch_size})")
    if len(prompts) != len(max_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_tokens)} max_tokens")
    first_step, computed = len(engine.step_log), 0
    for start in range(0, len(prompts), batch_size):
        group, outs = prompts[start:start + batch_size], max_tokens[start:start + batch_size]
        longest, steps = max(len(p) for p in group), max(outs)
        params = SamplingParams(max_tokens=steps, ignore_eos=True)
        for prompt in group:
            engine.add_request([pad_id] * (longest - len(prompt)) + list(prompt), params)
        while engine.has_unfinished():
            engine.step()
        computed += len(group) * (longest + steps - 1)
    return {"steps": len(engine.step_log) - first_step, "useful_tokens": sum(max_tokens), "computed_tokens": computed}


if __name__ == "__main__":
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig

    model = Llama.random(LlamaConfig.tiny())
    prompts = [[(5 * i + j) % 97 for j in range(3 + 6 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = Engine(model, num_blocks=10, block_size=8, max_num_seqs=3, max_num_batched_tokens=16, verbose=True)
    outputs = engine.generate(prompts, params, progress=False)
    same = [o.output_ids == generate(model, p, 8, stop_token_ids=[]) for p, o in zip(prompts, outputs)]
    print(f"{len(engine.step_log)} steps; engine == reference generate for every request: {all(same)}")
