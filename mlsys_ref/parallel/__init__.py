"""Parallelism on torch.distributed (gloo on CPU, NCCL on GPUs, also under torchrun): one file per idea.

- ``reference.py``: the single-process Llama-style model every parallel run is compared with.
- ``launch.py``: spawn N local ranks (timeouts everywhere), TP x PP x DP groups in Megatron order.
- ``comm.py``: counted collectives, Megatron's f/g, sequence-parallel gather/reduce-scatter, p2p.
- ``tensor_parallel.py``: column/row-parallel linears, vocab-parallel embedding and cross-entropy, TP block.
- ``pipeline_parallel.py``: stages, micro-batches, GPipe and 1F1B over send/recv.
- ``schedule_sim.py``: pure-Python timelines, bubble and in-flight activations (GPipe, 1F1B, interleaved).
- ``zero.py``: ZeRO-1/2 AdamW. ``recompute.py``: activation checkpointing and what it saves.
- ``verify.py``: parallel training jobs checked in every rank against the reference (tests, tour, notebooks).

Nothing is imported here, so ``import mlsys_ref.parallel`` never touches torch.distributed.
"""
