"""Loading released-format checkpoints (nnU-Net v1 .model, v2 .pth, .safetensors) into STU-Net."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from common.pretrained import INPUT_CONVS, load_pretrained, read_checkpoint, save_safetensors
from common.stunet import build_stunet

STRIDES = [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1]]


pytestmark = pytest.mark.usefixtures("one_thread")  # the CPUs are shared


def small_net(seed: int, in_channels: int = 1, num_classes: int = 2, base_width: int = 4):
    torch.manual_seed(seed)
    return build_stunet("T", in_channels=in_channels, num_classes=num_classes, base_width=base_width,
                        strides=STRIDES)


@pytest.fixture(scope="module")
def source():
    """The 'pretrained' net: 105 classes like the released TotalSegmentator weights."""
    return small_net(seed=0, num_classes=105)


def write_v1(path, state):
    # nnU-Net v1 trainer checkpoint: numpy scalars in the logged curves, as the real files have.
    torch.save({"epoch": 4000, "state_dict": OrderedDict(state), "optimizer_state_dict": {"state": {}},
                "amp_grad_scaler": {"scale": 65536.0},
                "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [], [np.float32(0.9)]),
                "best_stuff": (3999, np.float64(0.1), np.float64(0.9), np.float64(0.9))}, path)


def write_v2(path, state):
    torch.save({"network_weights": state, "optimizer_state": {"state": {}, "param_groups": []},
                "grad_scaler_state": None, "logging": {"mean_fg_dice": [np.float64(0.8)]},
                "_best_ema": np.float64(0.8), "current_epoch": 1000,
                "init_args": {"fold": 0, "configuration": "3d_fullres", "device": torch.device("cpu")},
                "trainer_name": "STUNetTrainer_small", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


def body(state):
    return {k: v for k, v in state.items() if not k.startswith("seg_outputs.")}


@pytest.mark.parametrize("fmt", ["v1", "v2", "v2-ddp", "safetensors"])
def test_loads_body_and_keeps_fresh_heads(tmp_path, source, fmt):
    state = source.state_dict()
    if fmt == "v1":
        path = tmp_path / "model_final_ep4k.model"
        write_v1(path, state)
    elif fmt.startswith("v2"):
        path = tmp_path / "checkpoint_final.pth"
        write_v2(path, {("module." + k if fmt == "v2-ddp" else k): v for k, v in state.items()})
    else:
        path = tmp_path / "weights.safetensors"
        save_safetensors(source, path, metadata={"origin": "test"})
    assert set(read_checkpoint(path)) == set(state)

    net = small_net(seed=1)
    heads_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("seg_outputs.")}
    report = load_pretrained(net, path)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in body(state).items())
    assert all(torch.equal(loaded[k], v) for k, v in heads_before.items())  # heads untouched
    assert loaded["seg_outputs.4.weight"].shape == (2, 4, 1, 1, 1)
    assert sorted(report.skipped) == sorted(heads_before) and not report.adapted
    assert sorted(report.loaded) == sorted(body(state))
    assert "loaded 120" in report.summary()


def test_heads_not_copied_even_when_class_count_matches(tmp_path):
    two_class = small_net(seed=0)
    path = tmp_path / "own.safetensors"
    save_safetensors(two_class.state_dict(), path)
    net = small_net(seed=1)
    load_pretrained(net, path)
    w = "seg_outputs.4.weight"
    assert not torch.equal(net.state_dict()[w], two_class.state_dict()[w])
    assert torch.equal(net.state_dict()["conv_blocks_localization.4.0.conv2.weight"],
                       two_class.state_dict()["conv_blocks_localization.4.0.conv2.weight"])


def test_weights_do_not_depend_on_the_plan_strides(tmp_path):
    # Released weights come from the [2,2,2]x4 + [1,1,2] plan; a site's plan has other strides.
    torch.manual_seed(0)
    pretrained = build_stunet("T", num_classes=105, base_width=4, strides=None)
    path = tmp_path / "pretraining_plan.model"
    write_v1(path, pretrained.state_dict())
    net = small_net(seed=1)
    assert net.strides != pretrained.strides
    report = load_pretrained(net, path)
    assert len(report.loaded) == len(body(pretrained.state_dict()))


def test_half_precision_checkpoint_is_cast(tmp_path, source):
    path = tmp_path / "half.safetensors"
    save_safetensors({k: v.half() for k, v in source.state_dict().items()}, path)
    net = small_net(seed=1)
    load_pretrained(net, path)
    w = "conv_blocks_context.2.0.conv1.weight"
    assert net.state_dict()[w].dtype == torch.float32
    assert torch.equal(net.state_dict()[w], source.state_dict()[w].half().float())


def test_more_input_channels_repeats_first_convs(tmp_path, source):
    path = tmp_path / "checkpoint_final.pth"
    write_v2(path, source.state_dict())
    net = small_net(seed=1, in_channels=3)
    report = load_pretrained(net, path)
    assert sorted(report.adapted) == sorted(INPUT_CONVS)
    for name in INPUT_CONVS:
        assert torch.allclose(net.state_dict()[name], source.state_dict()[name].repeat(1, 3, 1, 1, 1) / 3)
    # Three copies of one image through the adapted first stage = the image through the pretrained one.
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = source.conv_blocks_context[0](x)
        got = net.conv_blocks_context[0](x.repeat(1, 3, 1, 1, 1))
    assert torch.allclose(got, expected, atol=1e-5)


def test_input_channels_that_are_not_a_multiple_are_refused(tmp_path):
    path = tmp_path / "two_channel.safetensors"
    save_safetensors(small_net(seed=0, in_channels=2), path)
    with pytest.raises(ValueError, match="shape mismatch.*conv_blocks_context.0.0.conv1.weight"):
        load_pretrained(small_net(seed=1, in_channels=3), path)


def test_mismatches_are_refused_and_nothing_is_copied(tmp_path, source):
    net = small_net(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    wider = tmp_path / "wider.pth"
    write_v2(wider, small_net(seed=0, base_width=8).state_dict())
    with pytest.raises(ValueError, match=r"wider.pth: .*shape mismatch: conv_blocks_context.0.0.conv1.weight"):
        load_pretrained(net, wider)

    state = dict(source.state_dict())
    del state["conv_blocks_localization.2.0.norm1.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.model"
    write_v1(broken, state)
    with pytest.raises(ValueError) as err:
        load_pretrained(net, broken)
    message = str(err.value)
    assert "1 missing: conv_blocks_localization.2.0.norm1.bias" in message
    assert "1 unexpected: decoder.extra.weight" in message and "\n" not in message
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())

    report = load_pretrained(net, broken, strict_body=False)  # load what fits, list the rest
    assert report.missing == ["conv_blocks_localization.2.0.norm1.bias"]
    assert report.unexpected == ["decoder.extra.weight"]
    assert torch.equal(net.state_dict()["conv_blocks_context.0.0.conv1.weight"],
                       source.state_dict()["conv_blocks_context.0.0.conv1.weight"])


class _Payload:
    """Unpickling this would create a file: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_arbitrary_pickled_objects_are_refused(tmp_path, source):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"network_weights": source.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"evil.pth: refused.*GLOBAL io.open"):
        load_pretrained(small_net(seed=1), path)
    assert not marker.exists()


def test_unreadable_or_empty_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a readable torch checkpoint"):
        read_checkpoint(text)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        read_checkpoint(bad)
    no_weights = tmp_path / "plans_only.pth"
    torch.save({"init_args": {"fold": 0}}, no_weights)
    with pytest.raises(ValueError, match="no state dict found"):
        read_checkpoint(no_weights)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.model")


def test_pair_checkpoint_gives_each_branch_its_own_net_heads_included(tmp_path):
    """A pair file (`a.*`/`b.*`, as simulations/pretrain.py writes) starts each CPS branch from its own
    pretrained net, heads too; a released 105-class file keeps the fresh 2-class heads."""
    from common.pretrained import load_initial_weights

    nets = {"a": small_net(seed=1), "b": small_net(seed=2)}
    path = tmp_path / "pair.safetensors"
    save_safetensors({f"{b}.{k}": v for b, net in nets.items() for k, v in net.state_dict().items()}, path)
    for branch, source_net in nets.items():
        net = small_net(seed=9)
        summary = load_initial_weights(net, path, branch)
        assert "skipped 0 (heads)" in summary
        for name, tensor in net.state_dict().items():
            assert torch.equal(tensor, source_net.state_dict()[name]), (branch, name)
    with pytest.raises(ValueError, match="no branch 'c'"):
        load_initial_weights(small_net(seed=9), path, "c")


def test_heads_of_another_class_count_stay_fresh(tmp_path, source):
    path = tmp_path / "released.safetensors"
    save_safetensors(source, path)  # 105 classes
    net = small_net(seed=3)
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("seg_outputs.")}
    report = load_pretrained(net, path, heads=True)
    assert report.skipped and all(torch.equal(net.state_dict()[k], v) for k, v in fresh.items())
