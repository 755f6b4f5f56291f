import pytest

from trainprobe.probes import at_steps, every, log_spaced


def test_every_with_start():
    assert [s for s in range(12) if every(5)(s)] == [0, 5, 10]
    assert [s for s in range(12) if every(4, start=3)(s)] == [3, 7, 11]
    assert every(1).describe() == "every(1)"
    assert every(4, start=3).describe() == "every(4, start=3)"


def test_log_spaced_matches_the_rounded_powers():
    expected = {0} | {round(10 ** (i / 4)) for i in range(0, 21)}
    got = {s for s in range(100_001) if log_spaced(4)(s)}
    assert got == {s for s in expected if s <= 100_000}
    assert len([s for s in range(1000, 10_000) if log_spaced(10)(s)]) == 10


def test_at_steps_and_union():
    sched = at_steps(3, 7) | every(5)
    assert [s for s in range(11) if sched(s)] == [0, 3, 5, 7, 10]
    assert sched.describe() == "at_steps(3, 7) | every(5)"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: every(0), r"n must be an integer >= 1, got 0"),
        (lambda: every(2.5), r"n must be an integer >= 1, got 2.5"),
        (lambda: every(2, start=-1), r"start must be an integer >= 0"),
        (lambda: log_spaced(0), r"per_decade\) must be an integer >= 1"),
        (lambda: at_steps(1, -2), r"at_steps\(...\) step must be an integer >= 0, got -2"),
    ],
)
def test_bad_schedules_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
