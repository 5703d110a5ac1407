import torch

from trainers.bits import pack_bits, pack_rows, unpack_bits, unpack_rows, unpack_signs


def test_pack_unpack_round_trip_odd_shapes():
    torch.manual_seed(0)
    for shape in [(1,), (13,), (3, 5), (4, 3, 7, 5), (1, 9)]:
        mask = torch.rand(*shape) > 0.5
        packed = pack_bits(mask)
        assert torch.equal(unpack_bits(packed), mask)


def test_eight_values_per_byte():
    mask = torch.ones(100, 64, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.data.dtype == torch.uint8
    assert packed.nbytes == 100 * 64 // 8


def test_bit_order_and_signs():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True]])
    data = pack_rows(mask)
    assert data.tolist() == [[1, 1]]
    packed = pack_bits(mask, scale=0.5)
    assert unpack_signs(packed).tolist() == [[0.5] + [-0.5] * 7 + [0.5]]


def test_row_chunks_concatenate():
    mask = torch.rand(10, 3, 5) > 0.3
    whole = pack_rows(mask)
    parts = torch.cat([pack_rows(mask[:4]), pack_rows(mask[4:])])
    assert torch.equal(whole, parts)
    assert torch.equal(unpack_rows(whole[4:], mask.shape), mask[4:])
