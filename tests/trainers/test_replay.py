"""The latent-replay buffer: 1-bit storage, class balance, round trip, bad input."""

from __future__ import annotations

import pytest
import torch

from contract.errors import UsageError
from trainers.continual.replay import LatentReplayBuffer


def signs(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, *shape), generator=g).float() * 2 - 1


def filled(storage: str, features: tuple[int, ...], capacity: int = 300) -> LatentReplayBuffer:
    buffer = LatentReplayBuffer(capacity, storage=storage, min_classes=10, seed=1)
    for first in (0, 2, 4):
        labels = torch.tensor([first] * 200 + [first + 1] * 150)
        buffer.add(signs(350, *features, seed=first), labels)
    return buffer


@pytest.mark.parametrize("features", [(256,), (64, 3, 3)])
def test_packed_buffer_is_32x_smaller_than_fp32_for_the_same_entries(features):
    packed, fp32 = filled("packed", features), filled("fp32", features)
    assert len(packed) == len(fp32) == 300
    # same seed, same choices: the very same entries in both modes
    idx = torch.arange(len(packed))
    assert torch.equal(packed.take(idx)[0], fp32.take(idx)[0])
    # features are a multiple of 8, so there is no padding: exactly 32x, no overhead
    assert fp32.nbytes == 32 * packed.nbytes
    assert packed.nbytes == 300 * (torch.Size(features).numel() // 8)


def test_packed_overhead_is_the_per_entry_padding_to_a_whole_byte():
    packed, fp32 = filled("packed", (100,)), filled("fp32", (100,))
    # 100 features -> 13 bytes per entry (4 bits of padding); fp32 keeps 400 bytes
    padding_bits = 300 * 4
    assert 8 * packed.nbytes - padding_bits == fp32.nbytes * 8 // 32


def test_buffer_is_class_balanced_and_rebalances_as_classes_arrive():
    buffer = LatentReplayBuffer(300, min_classes=10, seed=0)
    buffer.add(signs(400, 16), torch.tensor([0] * 200 + [1] * 200))
    assert (buffer.count(0), buffer.count(1)) == (150, 150)
    buffer.add(signs(400, 16, seed=2), torch.tensor([2] * 200 + [3] * 200))
    assert [buffer.count(c) for c in range(4)] == [75, 75, 75, 75]
    buffer.add(signs(20, 16, seed=3), torch.tensor([4] * 20))  # fewer than the quota of 60
    assert [buffer.count(c) for c in range(5)] == [60, 60, 60, 60, 20]


def test_take_returns_the_stored_latents_with_their_labels():
    buffer = LatentReplayBuffer(10, min_classes=2, seed=0)
    a, b = signs(5, 24, seed=5), signs(5, 24, seed=6)
    buffer.add(torch.cat([a, b]), torch.tensor([3] * 5 + [7] * 5))
    latents, labels = buffer.take(torch.tensor([9, 0, 5]))
    # each class fits its quota of 5, so its rows are kept in the order given
    assert labels.tolist() == [7, 3, 7]
    assert torch.equal(latents, torch.stack([b[4], a[0], b[0]]))
    assert latents.dtype == torch.float32 and labels.dtype == torch.int64


def test_replay_size_below_the_number_of_classes_is_a_usage_error():
    with pytest.raises(UsageError, match="--replay-size 9 is below the 10 classes"):
        LatentReplayBuffer(9, min_classes=10)


def test_unknown_storage_is_a_usage_error():
    with pytest.raises(UsageError, match="replay storage 'fp16'"):
        LatentReplayBuffer(100, storage="fp16")


def test_non_sign_latents_are_refused():
    buffer = LatentReplayBuffer(10)
    with pytest.raises(ValueError, match="must be \\+-1"):
        buffer.add(torch.tensor([[0.5, -1.0]]), torch.tensor([0]))
