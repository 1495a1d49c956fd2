"""A smaller benchmarks/quant_quality.py: SmolLM2 cut to 6 layers, a few hundred tokens, the key rows."""

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from mlsys_ref.quant.evaluation import CALIBRATION_PLAYS, EVAL_PLAYS, logits_of, token_windows

ROOT = Path(__file__).resolve().parents[2]


def _benchmark():
    spec = importlib.util.spec_from_file_location("quant_quality", ROOT / "benchmarks" / "quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2():
    loader = pytest.importorskip("mlsys_ref.serving.loader")
    try:
        path = loader.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ's small per-column ops; see the benchmark's --threads
    model, tokenizer = loader.load_gguf(path)
    yield model, tokenizer
    torch.set_num_threads(threads)


def _truncated(model, depth):
    """The first ``depth`` blocks of the model, then its final norm and head (shares the tensors)."""
    small = copy.copy(model)
    small._modules = dict(model._modules)
    small.layers = torch.nn.ModuleList(list(model.layers)[:depth])
    small.config = dataclasses.replace(model.config, num_layers=depth)
    return small


@pytest.mark.slow
def test_quant_quality_small(smollm2):
    model, tokenizer = smollm2
    depth = 6
    small = _truncated(model, depth)
    eval_tokens = token_windows(tokenizer, EVAL_PLAYS, 2, 96)
    calibration = token_windows(tokenizer, CALIBRATION_PLAYS, 4, 96)
    bench = _benchmark()
    wanted = ("fp32", "RTN int4 g32 asym, float zero", "LLM.int8()", "SmoothQuant", "RTN int3 g64", "GPTQ int3 g64")
    configs = [c for c in bench.CONFIGS if c[0].startswith(wanted)]
    assert len(configs) == len(wanted)
    rows = {row["method"].split(" (")[0].split(",")[0]: row for row in bench.evaluate(small, eval_tokens, calibration, configs, log=lambda *_: None)}
    fp = rows["fp32"]["perplexity"]
    # the file's weights sit on the Q4_1 grid: a fractional-zero g32 quantizer gives them back
    assert abs(rows["RTN int4 g32 asym"]["perplexity"] - fp) <= 1e-3 * fp
    for int8 in ("LLM.int8()", "SmoothQuant W8A8"):
        assert abs(rows[int8]["perplexity"] - fp) <= 0.1 * fp, rows[int8]
    assert rows["GPTQ int3 g64 asym"]["perplexity"] < rows["RTN int3 g64 asym"]["perplexity"]
    # 3-bit codes + fp32 scale and zero per 64 + the act-order permutation: about 4.1 bits
    assert rows["GPTQ int3 g64 asym"]["bits/weight packed"] < 4.5 < 8 <= rows["LLM.int8()"]["bits/weight"]


def test_sdpa_attend_matches_dense_reference():
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.testing import assert_close

    model = Llama.random(LlamaConfig.tiny())
    tokens = torch.randint(0, 97, (3, 19))
    assert_close(logits_of(model, tokens), model.forward_dense(tokens), atol=1e-4, rtol=1e-4)  # fp32, two softmax paths
