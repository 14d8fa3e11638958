"""STU-Net structure: official names/shapes, forward shapes, strides, plans round trip, init."""
import json
import math
from pathlib import Path

import pytest
import torch

from common.stunet import (PRETRAINING_STRIDES, STUNet, build_stunet, build_stunet_from_plans,
                           stunet_architecture_block, stunet_strides)

REFERENCE = Path("/work/shared/reference/stunet_official_state_dict.json")
# Small strides so a 16^3-ish input runs through all 6 stages in milliseconds.
SMALL_STRIDES = [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1]]


pytestmark = pytest.mark.usefixtures("one_thread")  # the CPUs are shared


@pytest.fixture(scope="module")
def official() -> dict:
    return json.loads(REFERENCE.read_text())["sizes"]


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_official_names_shapes_and_counts(official, size):
    net = build_stunet(size, in_channels=1, num_classes=105, strides=PRETRAINING_STRIDES, device="meta")
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    ref = official[size]["keys"]
    assert list(ours) == list(ref)  # same names, same order
    assert ours == ref
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == official[size]["params"] == sum(math.prod(s) for s in ref.values())
    assert not list(net.buffers())  # InstanceNorm without running stats, as in the released files


def test_conv3_only_in_first_block_of_each_stage(official):
    # The official L (2 blocks/stage): conv3 in block 0 of every encoder and decoder stage, never block 1.
    conv3 = sorted(k for k in official["L"]["keys"] if ".conv3.weight" in k)
    expected = sorted([f"conv_blocks_context.{i}.0.conv3.weight" for i in range(6)]
                      + [f"conv_blocks_localization.{i}.0.conv3.weight" for i in range(5)])
    assert conv3 == expected
    net = build_stunet("L", num_classes=105, device="meta")
    assert sorted(k for k in net.state_dict() if ".conv3.weight" in k) == expected


def test_forward_shapes_deep_supervision_highest_resolution_first():
    torch.manual_seed(0)
    net = build_stunet("T", in_channels=1, num_classes=3, base_width=2, strides=SMALL_STRIDES)
    x = torch.randn(2, 1, 8, 16, 16)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert [tuple(o.shape) for o in outs] == [
        (2, 3, 8, 16, 16), (2, 3, 4, 8, 8), (2, 3, 2, 4, 4), (2, 3, 2, 2, 2), (2, 3, 2, 2, 2)]
    net.deep_supervision = False
    full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (2, 3, 8, 16, 16)
    assert torch.allclose(full, outs[0], atol=1e-5)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = build_stunet("T", base_width=2, strides=SMALL_STRIDES)
    loss = sum(o.float().square().mean() for o in net(torch.randn(1, 1, 8, 16, 16)))
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_input_checks():
    net = build_stunet("T", base_width=2, strides=SMALL_STRIDES)
    assert net.divisor == (4, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.zeros(1, 1, 8, 12, 16))
    with pytest.raises(ValueError, match="expects"):
        net(torch.zeros(1, 2, 8, 16, 16))
    with pytest.raises(ValueError, match="3x3x3"):
        STUNet(1, 2, [4] * 6, 1, SMALL_STRIDES, kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5)
    with pytest.raises(ValueError, match="6 stages"):
        STUNet(1, 2, [4] * 5, 1, SMALL_STRIDES)
    with pytest.raises(ValueError, match="unknown STU-Net size"):
        build_stunet("XL")


def test_stunet_strides_cut_pad_and_drop_leading_one():
    assert stunet_strides(None) == PRETRAINING_STRIDES
    plan6 = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert stunet_strides(plan6) == plan6[1:]
    assert stunet_strides([[1, 1, 1], [2, 2, 2], [2, 2, 2]]) == [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3
    deep = [[1, 1, 1]] + [[2, 2, 2]] * 7
    assert stunet_strides(deep) == [[2, 2, 2]] * 5
    with pytest.raises(ValueError, match="3 positive ints"):
        stunet_strides([[2, 2]])


def test_base_width_scales_channels():
    net = build_stunet("L", base_width=4, device="meta")
    widths = [stage[0].conv1.out_channels for stage in net.conv_blocks_context]
    assert widths == [4, 8, 16, 32, 64, 64]
    assert len(net.conv_blocks_context[0]) == 2  # L keeps its 2 blocks per stage


def test_plans_round_trip_and_nnunet_loader():
    block = stunet_architecture_block("T", base_width=2, strides=SMALL_STRIDES)
    json.dumps(block)  # plans are JSON
    kwargs = block["arch_kwargs"]
    assert kwargs["strides"] == [[1, 1, 1]] + SMALL_STRIDES and kwargs["kernel_sizes"] == [[3, 3, 3]] * 6
    plans = {"configurations": {"3d_fullres": {"architecture": block}}}
    torch.manual_seed(1)
    a = build_stunet_from_plans(plans, num_classes=2)
    torch.manual_seed(1)
    b = build_stunet("T", base_width=2, strides=SMALL_STRIDES)
    assert a.strides == b.strides == SMALL_STRIDES
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # nnU-Net's own loader can build it from the same block (the class is located by its dotted name).
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    net = get_network_from_plans(block["network_class_name"], kwargs, block["_kw_requires_import"],
                                 input_channels=1, output_channels=2, deep_supervision=False)
    assert isinstance(net, STUNet) and net(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="arch_kwargs"):
        build_stunet_from_plans({"configurations": {}})


def test_init_is_he_and_seedable():
    torch.manual_seed(3)
    a = build_stunet("T", base_width=4, strides=SMALL_STRIDES)
    torch.manual_seed(3)
    b = build_stunet("T", base_width=4, strides=SMALL_STRIDES)
    torch.manual_seed(4)
    c = build_stunet("T", base_width=4, strides=SMALL_STRIDES)
    w = "conv_blocks_context.5.0.conv2.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    weight = a.state_dict()[w]  # 64 x 64 x 3^3: kaiming normal, std = sqrt(2 / (1 + a^2)) / sqrt(fan_in)
    expected_std = math.sqrt(2 / (1 + 1e-4)) / math.sqrt(64 * 27)
    assert abs(weight.std().item() / expected_std - 1) < 0.05
    biases = [v for k, v in a.state_dict().items() if "conv" in k and k.endswith(".bias")]
    assert biases and all(torch.count_nonzero(v) == 0 for v in biases)
