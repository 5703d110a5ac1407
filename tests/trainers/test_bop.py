"""Bop: the update rule on hand-computed tensors, stored low-bit momentum, routing, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from contract.errors import UsageError
from trainers.bits import PackedBits, pack_rows, signs_from_bits, unpack_rows
from trainers.bop import Bop, bop_update, build_bop_optimizer, route_parameters
from trainers.bop import optimizer as bop_optimizer
from trainers.bop.fpformat import FloatFormat
from trainers.bop.search import GradientTrace, TraceWindow, search_momentum_format
from trainers.engine import train_step
from trainers.layers import binary_layers, binary_weights, weight_values
from trainers.methods import LowMemSwitches, make_recipe
from trainers.models import build_model


def test_update_rule_on_hand_computed_tensors():
    w = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    m = torch.tensor([0.0, 0.2, 0.2, -0.4, 0.0])
    g = torch.tensor([1.0, -0.8, 0.6, 0.0, 0.0])
    result = bop_update(w, m, g, gamma=0.5, tau=0.15)
    # m + 0.5 (g - m): 0.5, -0.3, 0.4, -0.2, 0.0
    assert torch.allclose(result.momentum, torch.tensor([0.5, -0.3, 0.4, -0.2, 0.0]))
    # flip where w*m > 0.15: 0.5 yes, 0.3 no (w*m=-0.3), -0.4 no, 0.2 yes, 0 no
    assert result.flipped.tolist() == [True, False, False, True, False]
    assert result.weight.tolist() == [-1.0, 1.0, -1.0, 1.0, 1.0]
    assert torch.allclose(result.step, torch.tensor([0.5, -0.5, 0.2, 0.2, 0.0]))


def test_update_rounds_momentum_into_the_format_before_the_flip():
    fmt = FloatFormat(3, 2, 3)  # values 0.25 * {1, 1.25, 1.5, 1.75} * 2^k ...
    w = torch.tensor([1.0, 1.0])
    result = bop_update(w, torch.zeros(2), torch.tensor([1.1, 0.3]), 1.0, 1.2, fmt)
    assert result.momentum.tolist() == [1.0, 0.3125]  # 1.1 -> 1.0, 0.3 -> 0.3125
    assert result.flipped.tolist() == [False, False]  # 1.1 > 1.2 is False either way


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"gamma": 0.0}, "0.0"), ({"gamma": 1.5}, "1.5"), ({"tau": -1.0}, "-1.0"),
     ({"tau": math.nan}, "nan")],
)
def test_bad_hyperparameters_are_value_errors_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Bop([nn.Parameter(torch.ones(4))], **kwargs)


def test_bad_momentum_formats_are_one_line_usage_errors():
    p = nn.Parameter(torch.ones(4))
    with pytest.raises(UsageError, match="tau=1e-08"):
        Bop([p], momentum_format="5,10")  # float16 cannot represent 1e-8
    with pytest.raises(UsageError, match="'5,x'"):
        Bop([p], momentum_format="5,x")
    with pytest.raises(UsageError, match="got 9"):
        Bop([p], momentum_format="9,30")


def test_parameters_become_signs_and_state_is_lazy():
    p = nn.Parameter(torch.tensor([[0.3, -0.2], [0.0, -5.0]]))
    opt = Bop([p], momentum_format="4,7,22")
    assert p.tolist() == [[1.0, -1.0], [1.0, -1.0]]
    assert len(opt.state) == 0
    assert opt.defaults == {"gamma": 1e-4, "tau": 1e-8, "momentum_format": "4,7,22"}


@pytest.mark.parametrize(("spec", "dtype", "nbytes"), [
    ("4,3,10", torch.uint8, 1000), ("5,10,30", torch.int16, 2000), ("4,7,20", torch.uint8, 1500),
    (None, torch.float32, 4000)])
def test_step_matches_pure_rule_and_stores_compactly(monkeypatch, spec, dtype, nbytes):
    monkeypatch.setattr(bop_optimizer, "CHUNK_ELEMENTS", 96)  # several chunks per tensor
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(40, 25, generator=gen))
    opt = Bop([p], gamma=0.1, tau=1e-3, momentum_format=spec)
    fmt = FloatFormat.parse(spec) if spec else None
    w, m = p.detach().clone(), torch.zeros(40, 25)
    for _ in range(4):
        g = torch.randn(40, 25, generator=gen) * 1e-2
        p.grad = g.clone()
        opt.step()
        expected = bop_update(w, m, g, 0.1, 1e-3, fmt)
        w, m = expected.weight, expected.momentum
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.momentum(p), m)
    storage = opt.state[p]["momentum"]
    assert storage.dtype == dtype and opt.state_bytes() == nbytes
    assert opt.last_lost_updates.layers[0].name == "group0.0"


def test_packed_one_bit_gradients_are_consumed():
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(16, 3, 3, 3, generator=gen))
    opt = Bop([p], gamma=0.5, tau=0.0, momentum_format="4,7,20")
    bits = torch.randn(16, 3, 3, 3, generator=gen) >= 0
    scale = 1 / math.sqrt(p.numel())
    p.packed_grad = PackedBits(pack_rows(bits), p.shape, scale)
    w = p.detach().clone()
    opt.step()
    g = signs_from_bits(unpack_rows(pack_rows(bits), p.shape), torch.float32, scale)
    expected = bop_update(w, torch.zeros_like(w), g, 0.5, 0.0, FloatFormat.parse("4,7,20"))
    assert torch.equal(p.detach(), expected.weight)
    assert p.packed_grad is None


def test_state_dict_round_trips_encoded_momentum_through_torch_save():
    gen = torch.Generator().manual_seed(2)
    params = [nn.Parameter(torch.randn(8, 9, generator=gen).half()) for _ in range(2)]
    opt = Bop(params, gamma=0.3, tau=1e-4, momentum_format="5,10,20")
    grads = [[torch.randn(8, 9, generator=gen).half() * 0.1 for _ in params] for _ in range(4)]
    for step_grads in grads[:2]:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    restored = Bop(copies, gamma=0.9, tau=0.5)  # hyperparameters come from the state dict
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.param_groups[0]["gamma"] == 0.3
    assert restored.state[copies[0]]["momentum"].dtype == torch.int16
    for step_grads in grads[2:]:
        for p, c, g in zip(params, copies, step_grads):
            p.grad, c.grad = g, g.clone()
        opt.step()
        restored.step()
    for p, c in zip(params, copies):
        assert torch.equal(p, c)
        assert torch.equal(opt.momentum(p), restored.momentum(c))


def test_changing_the_format_in_the_param_group_re_encodes():
    p = nn.Parameter(torch.ones(64))
    opt = Bop([p], gamma=0.5, tau=0.0)
    p.grad = torch.full((64,), -0.3)
    opt.step()
    opt.param_groups[0]["momentum_format"] = "4,7,20"
    p.grad = torch.full((64,), -0.3)
    opt.step()
    assert opt.state[p]["momentum"].dtype == torch.uint8
    assert opt.momentum(p)[0].item() == FloatFormat(4, 7, 20).quantize(torch.tensor(-0.225)).item()


def test_gamma_schedule_through_param_group():
    p = nn.Parameter(torch.ones(4))
    opt = Bop([p], gamma=0.5, tau=10.0)
    p.grad = torch.ones(4)
    opt.step()
    opt.param_groups[0]["gamma"] = 0.1
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(opt.momentum(p), torch.full((4,), 0.45))


GAMMA = 1e-4
SMALL_GRAD = 2.0**-25 / GAMMA  # |gamma * g| below half of float16's smallest subnormal


def small_gradient_trace(steps: int = 12, n: int = 512) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.rand(steps, n, generator=gen) * SMALL_GRAD * 0.99 + SMALL_GRAD * 0.005


def run_bop(spec: str, grads: torch.Tensor, **kwargs) -> tuple[Bop, int, list]:
    p = nn.Parameter(torch.ones(grads.shape[1]))  # w = +1, m > 0: flips once m > tau
    opt = Bop([p], gamma=GAMMA, tau=1e-8, momentum_format=spec, **kwargs)
    flips, records = 0, []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        flips += opt.last_lost_updates.flips
        records.append(opt.last_lost_updates)
    return opt, flips, records


def test_float16_momentum_with_tiny_tau_never_flips_and_reports_lost_updates():
    grads = small_gradient_trace()
    # Every step adds |gamma g| < 2^-25 to m = 0, which rounds back to 0 in float16: m stays 0,
    # so w * m > tau never holds. The metric counts every one of those updates as lost.
    opt, flips, records = run_bop("5,10", grads, check_tau=False)
    assert flips == 0
    assert torch.count_nonzero(opt.momentum(opt.param_groups[0]["params"][0])) == 0
    assert all(r.lost == r.attempted == grads.shape[1] for r in records)
    assert records[-1].lost_fraction == 1.0

    window = TraceWindow.from_zero(grads, torch.ones(grads.shape[1]))
    trace = GradientTrace(window, window, (grads.shape[1],))
    report = search_momentum_format(trace, gamma=GAMMA, tau=1e-8, tolerance=0.05)
    assert {c.bits for c in report.candidates} == set(range(4, 17))
    float16 = next(c for c in report.candidates if c.spec == "5,10,15")
    assert not float16.represents_tau and not float16.eligible and float16.lost_fraction == 1.0
    assert report.choice is not None and report.choice.bits <= 16
    _, chosen_flips, chosen_records = run_bop(report.choice.spec, grads)
    assert chosen_flips == grads.shape[1]  # every weight flips once its momentum passes tau
    assert sum(r.lost for r in chosen_records) <= 0.05 * sum(r.attempted for r in chosen_records)


def test_routing_refuses_parameters_claimed_twice_or_not_at_all():
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    named = [("a", a), ("b", b), ("c", c)]
    assert route_parameters(named, {"bop": [a], "adam": [b, c]})["adam"] == [("b", b), ("c", c)]
    with pytest.raises(UsageError, match="parameter 'b' is claimed by both 'bop' and 'adam'"):
        route_parameters(named, {"bop": [a, b], "adam": [b, c]})
    with pytest.raises(UsageError, match="parameter 'c' is claimed by no optimizer"):
        route_parameters(named, {"bop": [a], "adam": [b]})
    with pytest.raises(UsageError, match="not a trainable parameter"):
        route_parameters(named[:2], {"bop": [a], "adam": [b, c]})


@pytest.mark.parametrize("switches", [(), LowMemSwitches.lowmem().enabled()])
def test_routed_optimizer_trains_real_model_and_round_trips(switches):
    recipe = make_recipe("bop", enable=switches, momentum_format="4,7,22")
    torch.manual_seed(0)
    model = build_model("mlp", recipe, in_shape=(1, 8, 8))
    opt = build_bop_optimizer(model, recipe, gamma=1e-3)
    binary = {id(p) for p in binary_weights(model)}
    bop_params = {id(p) for p in opt.optimizers["bop"].param_groups[0]["params"]}
    assert bop_params == binary
    others = {id(p) for g in opt.optimizers["adam"].param_groups for p in g["params"]}
    assert others | binary == {id(p) for p in model.parameters()} and not others & binary
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(3):
        assert math.isfinite(train_step(model, opt, x, y))
    for layer in binary_layers(model):  # packed sign bits with the lowmem switches on
        assert set(weight_values(layer).detach().float().unique().tolist()) <= {-1.0, 1.0}
    lost = opt.last_lost_updates
    assert lost.layers[0].name == "0.layer.weight"
    assert lost.attempted > 0 and 0.0 <= lost.lost_fraction <= 1.0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a copy: torch's load would share unchanged tensors
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["optimizers"]) == {"bop", "adam"}
    twin = build_model("mlp", recipe, in_shape=(1, 8, 8))
    twin.load_state_dict(model.state_dict())
    twin_opt = build_bop_optimizer(twin, recipe, gamma=1e-3)
    twin_opt.load_state_dict(state)
    train_step(model, opt, x, y)
    train_step(twin, twin_opt, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_auto_format_without_warmup_data_is_refused():
    recipe = make_recipe("bop", momentum_format="auto")
    model = build_model("mlp", recipe, in_shape=(1, 8, 8))
    with pytest.raises(UsageError, match="auto needs warm-up batches"):
        build_bop_optimizer(model, recipe)


@pytest.mark.parametrize("name", ["mlp", "cnv"])
def test_low_memory_bop_holds_binary_weights_as_packed_bits(name):
    """lowmem + Bop keeps each binary weight as one bit; training flips the same weights as
    with the +-1 weights held in float16."""
    from dataclasses import replace

    from trainers.bits import PackedBits, unpack_signs
    from trainers.bop import build_bop_optimizer
    from trainers.engine import train_step
    from trainers.layers import binary_layers, weight_shape
    from trainers.methods import make_recipe
    from trainers.models import build_model

    recipe = make_recipe("lowmem", optimizer="bop", momentum_format="6,5,67")
    torch.manual_seed(0)
    packed = build_model(name, recipe)
    torch.manual_seed(0)
    unpacked = build_model(name, replace(recipe, optimizer="adam"))  # same init, float16
    for layer in binary_layers(packed):
        assert layer.weight.dtype == torch.uint8
        assert layer.weight.numel() * 8 >= weight_shape(layer).numel() > (
            layer.weight.numel() - layer.weight.shape[0]) * 8
    optimizers = [build_bop_optimizer(m, recipe) for m in (packed, unpacked)]
    torch.manual_seed(1)
    batches = [(torch.rand(8, *packed.in_shape) * 2 - 1, torch.randint(0, 10, (8,)))
               for _ in range(3)]
    for x, y in batches:
        for model, optimizer in zip((packed, unpacked), optimizers):
            train_step(model, optimizer, x, y)
    for a, b in zip(binary_layers(packed), binary_layers(unpacked)):
        signs = unpack_signs(PackedBits(a.weight.data, weight_shape(a)))
        assert torch.equal(signs, b.weight.detach().float())


# Every container (uint8 codes, int16 codes, bitstreams of 4..15 bits) and every edge rule:
# no mantissa, flushed subnormals, overflow to infinity, float32 momentum.
COMPILED_FORMATS = [
    FloatFormat(2, 1), FloatFormat(3, 0, 10), FloatFormat(4, 3, 10), FloatFormat(3, 4, 12),
    FloatFormat(5, 10, 30), FloatFormat(8, 7), FloatFormat(6, 5, 67), FloatFormat(4, 7, 22),
    FloatFormat(5, 9, 28), FloatFormat(4, 5, 20, saturate=False),
    FloatFormat(5, 6, 25, subnormals=False), FloatFormat(8, 6, 140, saturate=False), None,
]


@pytest.mark.compiler
@pytest.mark.parametrize("fmt", COMPILED_FORMATS, ids=lambda f: f.spec if f else "fp32")
def test_compiled_update_equals_the_reference_bit_for_bit(monkeypatch, fmt):
    """The C++ update stores the same codes, flips the same weights, counts the same losses."""
    from trainers import native

    if native.load() is None:
        pytest.skip(f"compiled kernels cannot be built here: {native.status()}")
    monkeypatch.setattr(bop_optimizer, "CHUNK_ELEMENTS", 200)  # chunks with stream offsets
    gen = torch.Generator().manual_seed(7)
    shape = (37, 23)
    start = torch.randn(shape, generator=gen)
    scale = fmt.max_finite if fmt else 1.0
    runs = {}
    for compiled in (False, True):
        native.set_fused(compiled)
        try:
            p = nn.Parameter(start.clone())
            opt = Bop([p], gamma=0.3, tau=fmt.min_subnormal * 4 if fmt else 1e-6,
                      momentum_format=fmt, check_tau=False)
            history = []
            for step in range(6):
                g = torch.randn(shape, generator=torch.Generator().manual_seed(step))
                g = g * torch.logspace(-12, 1, shape[1]) * scale  # subnormal .. overflowing
                if step == 3:
                    g[0, :4] = torch.tensor([math.inf, -math.inf, math.nan, -0.0])
                opt.param_groups[0]["gamma"] = 1e-9 if step == 4 else 0.3  # steps lost in fp32
                p.grad = g
                opt.step()
                layer = opt.last_lost_updates.layers[0]
                history.append((layer.attempted, layer.lost, layer.flips))
            runs[compiled] = (p.detach().clone(), opt.state[p]["momentum"].clone(), history)
        finally:
            native.set_fused(True)
    (w_ref, m_ref, h_ref), (w_c, m_c, h_c) = runs[False], runs[True]
    assert torch.equal(w_c, w_ref)
    assert m_c.dtype == m_ref.dtype
    assert torch.equal(m_c.view(torch.uint8), m_ref.view(torch.uint8))
    assert h_c == h_ref
    assert any(flips for _, _, flips in h_ref) and any(lost for _, lost, _ in h_ref)
