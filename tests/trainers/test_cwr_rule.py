"""CWR* consolidation on hand-computed numbers (docs/methods.md section 4)."""

from __future__ import annotations

import math

import torch

from trainers.continual.cwr import CWRStar


def test_first_time_a_class_is_seen_it_takes_the_centred_row():
    cwr = CWRStar()
    head = torch.tensor([[1.0, 2.0], [3.0, 6.0], [9.0, 9.0]])
    cwr.consolidate(head, {0: 10, 1: 30})
    # mean of the current classes' weights (rows 0 and 1): (1 + 2 + 3 + 6) / 4 = 3
    assert torch.equal(cwr.consolidated[0], torch.tensor([-2.0, -1.0]))
    assert torch.equal(cwr.consolidated[1], torch.tensor([0.0, 3.0]))
    assert cwr.past_count == {0: 10, 1: 30}
    assert 2 not in cwr.consolidated  # not a current class: untouched


def test_seen_again_with_different_counts_is_weighted_by_sqrt_of_count_ratio():
    cwr = CWRStar()
    cwr.consolidate(torch.tensor([[1.0, 2.0], [3.0, 6.0], [9.0, 9.0]]), {0: 10, 1: 30})

    head = torch.full((3, 2), 7.0)
    cwr.before_experience(head, [1, 2])
    # zeroed, then class 1 (seen before) loaded; class 2 (new) stays zero
    assert torch.equal(head, torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))

    trained = torch.tensor([[0.0, 0.0], [5.0, 4.0], [1.0, 0.0]])
    cwr.consolidate(trained, {1: 10, 2: 5})
    # mean of rows 1, 2 = (5 + 4 + 1 + 0) / 4 = 2.5; new1 = [2.5, 1.5]; new2 = [-1.5, -2.5]
    # wpast = sqrt(30 / 10) = sqrt(3); cw1 = ([0, 3] * sqrt(3) + [2.5, 1.5]) / (sqrt(3) + 1)
    r3 = math.sqrt(3)
    expected_1 = torch.tensor([2.5 / (r3 + 1), (3 * r3 + 1.5) / (r3 + 1)])  # [0.91506, 2.45096]
    assert torch.allclose(cwr.consolidated[1], expected_1, atol=1e-6)
    assert torch.allclose(cwr.consolidated[1], torch.tensor([0.9150635, 2.4509619]), atol=1e-6)
    assert torch.equal(cwr.consolidated[2], torch.tensor([-1.5, -2.5]))
    assert cwr.past_count == {0: 10, 1: 40, 2: 5}
    assert torch.equal(cwr.consolidated[0], torch.tensor([-2.0, -1.0]))

    cwr.load_all(trained)
    assert torch.allclose(
        trained, torch.tensor([[-2.0, -1.0], [0.9150635, 2.4509619], [-1.5, -2.5]]), atol=1e-6
    )


def test_equal_counts_average_the_old_and_new_rows_equally():
    cwr = CWRStar()
    cwr.consolidate(torch.tensor([[4.0], [0.0]]), {0: 8, 1: 8})  # cw0 = [2], cw1 = [-2]
    cwr.consolidate(torch.tensor([[0.0], [6.0]]), {0: 8, 1: 8})  # new0 = [-3], new1 = [3]
    assert torch.allclose(cwr.consolidated[0], torch.tensor([-0.5]))  # (2 * 1 - 3) / 2
    assert torch.allclose(cwr.consolidated[1], torch.tensor([0.5]))
    assert cwr.past_count == {0: 16, 1: 16}


def test_consolidation_does_not_alias_the_head():
    cwr = CWRStar()
    head = torch.tensor([[1.0], [3.0]])
    cwr.consolidate(head, {0: 1, 1: 1})
    head.zero_()
    assert torch.equal(cwr.consolidated[0], torch.tensor([-1.0]))
