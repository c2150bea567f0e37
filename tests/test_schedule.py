import numpy as np
import pytest

from garden.errors import GardenError
from garden.schedule import PYTHIA_STEPS, eval_subset, log_linear_schedule, select_steps
from garden.settings import StepSettings, read_section

PYTHIA_EVAL = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] + [3000 + 10000 * i for i in range(15)]


def test_pythia_schedule_has_exactly_the_154_steps():
    assert len(PYTHIA_STEPS) == 154
    assert PYTHIA_STEPS[:11] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert PYTHIA_STEPS[11:] == tuple(range(1000, 143001, 1000))
    assert len(set(PYTHIA_STEPS)) == 154


def test_eval_subset_is_eleutherais_27_steps():
    subset = eval_subset(PYTHIA_STEPS)
    assert subset == PYTHIA_EVAL
    assert len(subset) == 27


def test_eval_subset_of_a_scaled_schedule_keeps_the_shape():
    steps = log_linear_schedule(20, 1200)
    assert steps[:6] == [0, 1, 2, 4, 8, 16]
    assert eval_subset(steps) == [0, 1, 2, 4, 8, 16, 20, 60, 260, 460, 660, 860, 1060, 1200]


def selection(**values) -> StepSettings:
    """A `steps.*` selection as the schema reads it (its rules checked)."""
    return read_section(StepSettings, values, "steps.")


def test_every_keeps_first_and_last():
    chosen = select_steps(PYTHIA_STEPS, selection(select="every", stride=50))
    assert chosen[0] == 0 and chosen[-1] == 143000
    assert chosen == sorted(set(PYTHIA_STEPS[::50]) | {143000})


def test_list_selection_and_missing_steps_are_named():
    assert select_steps(PYTHIA_STEPS, selection(select="list", values=[143000, 0, 1000])) == [0, 1000, 143000]
    with pytest.raises(GardenError, match=r"steps \[1500\] are not in the series"):
        select_steps(PYTHIA_STEPS, selection(select="list", values=[0, 1500]))


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"select": "sometimes"},
            "steps.select='sometimes' is not valid; valid: one of all, eval, every, list, log",
        ),
        ({"select": "log", "count": 1}, "steps.count=1 is not valid; valid: an integer >= 2"),
        ({"select": "every", "stride": 0}, "steps.stride=0 is not valid; valid: an integer >= 1"),
        (
            {"select": "list", "values": []},
            r"steps.values=\[\] is not valid; valid: a list of training steps",
        ),
        ({"select": "list"}, "needs steps.values"),
        ({"select": "list", "values": [0]}, "at least two checkpoints"),
    ],
)
def test_bad_selections_fail_clearly(values, message):
    with pytest.raises(GardenError, match=message):
        select_steps(PYTHIA_STEPS, selection(**values))


def test_log_subset_spaces_steps_evenly_per_decade_on_any_schedule():
    chosen = select_steps(PYTHIA_STEPS, selection(select="log", count=20))
    assert len(chosen) == 20 and chosen[0] == 0 and chosen[-1] == 143000
    assert chosen[1:11] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # the dense early part, one per octave
    olmo_like = list(range(1000, 929001, 1000))  # a branch every 1000 steps, from step 1000
    picked = select_steps(olmo_like, selection(select="log", count=7))
    targets = np.geomspace(1000, 929000, 7)  # each pick is the branch nearest numpy's geometric target
    assert len(picked) == 7 and all(abs(p - t) <= 500 for p, t in zip(picked, targets, strict=True))
    assert select_steps([0, 5, 10], selection(select="log", count=30)) == [0, 5, 10]  # fewer than asked: all
