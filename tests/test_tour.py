"""The tour runs every area's checks, prints a row each, and fails when a row fails."""

import io

import pytest
import torch

from mlsys_ref import tour
from mlsys_ref.tour import AREAS, Check, collect, run_tour


@pytest.mark.parametrize("area", AREAS)
def test_tour_area_passes(area):
    if not collect(area):
        pytest.skip(f"{area} has no tour checks yet")
    stream = io.StringIO()
    assert run_tour(only=area, stream=stream) == 0, stream.getvalue()
    text = stream.getvalue()
    for _, check in collect(area):
        assert check.technique in text


def test_failing_row_fails_the_tour(monkeypatch):
    def wrong(device):
        return 1.0, 1e-5

    def crashes(device):
        raise RuntimeError("boom")

    fake = [("attention", Check("wrong one", "nobody", wrong)), ("attention", Check("crash", "nobody", crashes))]
    monkeypatch.setattr(tour, "collect", lambda only=None: fake)
    stream = io.StringIO()
    assert run_tour(stream=stream) == 1
    text = stream.getvalue()
    assert "FAIL" in text and "RuntimeError: boom" in text and "0 passed, 2 failed" in text


def test_empty_tour_fails(monkeypatch):
    monkeypatch.setattr(tour, "collect", lambda only=None: [])
    assert run_tour(stream=io.StringIO()) == 1


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        run_tour(device="cuda", stream=io.StringIO())
