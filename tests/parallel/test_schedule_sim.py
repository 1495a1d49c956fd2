"""The pipeline schedule simulator against the closed forms of GPipe and Megatron-LM §2.2."""

import pytest

from mlsys_ref.parallel.schedule_sim import gpipe_bubble, simulate, stage_order


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 3), (4, 4), (4, 7), (3, 16), (8, 5)])
def test_bubble_uniform_times(schedule, p, m):
    t = simulate(schedule, p, m, t_f=1.0, t_b=2.0)
    assert t.bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert t.makespan == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("p,m", [(2, 3), (4, 4), (4, 9), (5, 2)])
def test_in_flight(p, m):
    gpipe, one_f_one_b = simulate("gpipe", p, m), simulate("1f1b", p, m)
    assert gpipe.peak_in_flight == [m] * p
    assert all(peak <= p for peak in one_f_one_b.peak_in_flight)
    assert one_f_one_b.peak_in_flight == [min(p - s, m) for s in range(p)]


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3)])
def test_interleaved_bubble(p, m, v):
    assert simulate("interleaved", p, m, v=v).bubble == pytest.approx(gpipe_bubble(p, m, v), abs=1e-12)


def test_every_operation_once_and_dependencies_respected():
    t = simulate("1f1b", 4, 6, t_f=[1.0, 1.5, 0.7, 1.1], t_b=[2.0, 2.5, 1.3, 2.2], t_comm=0.1)
    ends = {(op.kind, op.stage, op.micro_batch): op.end for op in t.ops}
    assert len(ends) == len(t.ops) == 2 * 4 * 6
    for op in t.ops:
        if op.kind == "F" and op.stage > 0:
            assert op.start >= ends[("F", op.stage - 1, op.micro_batch)] + 0.1 - 1e-12
        if op.kind == "B":
            before = ("B", op.stage + 1, op.micro_batch) if op.stage < 3 else ("F", 3, op.micro_batch)
            assert op.start >= ends[before] - 1e-12
    for s in range(4):  # a stage runs one operation at a time
        mine = sorted((op for op in t.ops if op.stage == s), key=lambda op: op.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))
    assert 0 < t.bubble < 1


def test_1f1b_order_is_megatrons():
    assert stage_order("1f1b", 4, 5, 1) == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("B", 0, 0), ("F", 3, 0),
                                            ("B", 1, 0), ("F", 4, 0), ("B", 2, 0), ("B", 3, 0), ("B", 4, 0)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="zb", p=2, m=2), "schedule"),
    (dict(schedule="gpipe", p=0, m=2), "positive"),
    (dict(schedule="interleaved", p=4, m=6, v=2), "multiple"),
    (dict(schedule="1f1b", p=2, m=2, t_f=[1.0]), "one time per stage"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**kwargs)


def test_plot_timeline_runs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlsys_ref.parallel.schedule_sim import plot_timeline

    ax = plot_timeline(simulate("interleaved", 2, 4, v=2))
    assert "bubble" in ax.get_title()
    plt.close("all")
