"""The model registry: architectures as docs/methods.md states them, per recipe."""

import pytest
import torch

from contract.errors import UsageError
from trainers.blocks import BinaryBlock
from trainers.layers import binary_weights
from trainers.methods import make_recipe
from trainers.models import MODELS, build_model, layer_inventory


def test_mlp_layers():
    inv = layer_inventory(build_model("mlp", make_recipe("standard")))
    assert [(i.input_elements, i.output_elements) for i in inv] == [
        (784, 256), (256, 256), (256, 256), (256, 256), (256, 10)]
    assert all(i.kind == "binary_dense" and i.bn_channels == i.output_elements for i in inv)


def test_cnv_layers():
    inv = layer_inventory(build_model("cnv", make_recipe("standard")))
    assert [i.input_elements for i in inv] == [
        3072, 30 * 30 * 64, 14 * 14 * 64, 12 * 12 * 128, 5 * 5 * 128, 3 * 3 * 256, 256, 512,
        512]
    assert [i.weights for i in inv][:2] == [3 * 64 * 9, 64 * 64 * 9]
    assert [i.kind for i in inv] == ["binary_conv"] * 6 + ["binary_dense"] * 3


def test_binarynet_pools_before_batch_norm():
    model = build_model("binarynet", make_recipe("standard"))
    inv = layer_inventory(model)
    assert [i.input_elements for i in inv] == [
        3072, 32 * 32 * 128, 16 * 16 * 128, 16 * 16 * 256, 8 * 8 * 256, 8 * 8 * 512, 8192, 1024,
        1024]
    pools = [b.spec.pool for b in model.modules() if isinstance(b, BinaryBlock)]
    assert pools == [None, "before_bn", None, "before_bn", None, "before_bn", None, None, None]


def test_resnete18_has_16_binary_convs_and_real_stem_shortcuts_head():
    model = build_model("resnete18", make_recipe("standard"), in_shape=(3, 64, 64))
    inv = layer_inventory(model)
    kinds = [i.kind for i in inv]
    assert kinds.count("binary_conv") == 16
    assert kinds[0] == "real_conv" and inv[0].weights == 3 * 64 * 7 * 7
    assert kinds.count("real_conv") == 1 + 3  # stem + three 1x1 downsampling convs
    assert kinds[-1] == "real_dense" and inv[-1].weights == 512 * 10
    assert len(binary_weights(model)) == 16


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["standard", "lowmem"])
def test_every_model_trains_one_step(name, method):
    torch.manual_seed(0)
    recipe = make_recipe(method)
    shape = (3, 32, 32) if name == "resnete18" else None
    model = build_model(name, recipe, in_shape=shape)
    x = torch.rand(2, *model.in_shape) * 2 - 1
    out = model(x)
    assert out.shape == (2, 10)
    out.float().sum().backward()
    if method == "lowmem":
        w = binary_weights(model)[1]
        assert w.dtype == torch.float16 and w.grad is None and w.packed_grad is not None


def test_bad_names_and_shapes():
    with pytest.raises(UsageError, match=r"unknown model 'vgg'.*binarynet, cnv, mlp, resnete18"):
        build_model("vgg", make_recipe("standard"))
    with pytest.raises(UsageError, match="cannot take input shape"):
        build_model("cnv", make_recipe("standard"), in_shape=(1, 8, 8))
    with pytest.raises(UsageError, match="unknown method"):
        make_recipe("fast")
    with pytest.raises(UsageError, match="unknown lowmem switch 'po3_grads'"):
        make_recipe("lowmem", disable=("po3_grads",))
