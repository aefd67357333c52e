import pytest
import torch

from n2ce_distill.nets import ToyMLP, tiny_unet


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_toy_mlp_shapes_broadcast_and_round_trip(tmp_path, embedding):
    torch.manual_seed(0)
    net = ToyMLP(dim=2, width=32, depth=2, time_embedding_type=embedding).eval()
    x = torch.randn(5, 2)
    out = net(x, torch.full((5,), 0.3)).sample
    assert out.shape == (5, 2)
    # scalar, 0-dim and (B,) timesteps agree; fractional and negative values are fine (EDM's ln(s)/4)
    torch.testing.assert_close(net(x, 0.3).sample, out)
    torch.testing.assert_close(net(x, torch.tensor(0.3)).sample, out)
    assert torch.isfinite(net(x, torch.tensor(-1.5)).sample).all()
    assert not torch.allclose(net(x, 0.3).sample, net(x, 0.9).sample)  # the timestep matters
    net.save_pretrained(tmp_path)
    again = ToyMLP.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(x, 0.3).sample, out, rtol=0, atol=0)  # incl. the Fourier buffer


def test_toy_mlp_class_conditioning_and_errors():
    net = ToyMLP(dim=3, width=16, depth=1, num_class_embeds=4)
    x, t = torch.randn(4, 3), torch.zeros(4)
    a = net(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample
    b = net(x, t, class_labels=torch.tensor([1, 1, 1, 1])).sample
    assert a.shape == (4, 3) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        ToyMLP(width=8)(torch.randn(2, 2), 0.0, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="time_embedding_type"):
        ToyMLP(time_embedding_type="nope")


def test_tiny_unet_at_8x8_with_middle_block_and_classes():
    torch.manual_seed(0)
    unet = tiny_unet(8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=10)
    seen = {}

    def record(module, args):
        seen["mid_in"] = args[0].shape  # returns None: inputs unchanged

    unet.mid_block.register_forward_pre_hook(record)
    x = torch.randn(3, 1, 8, 8)
    out = unet(x, torch.tensor([0.5, 1.0, 2.0]), class_labels=torch.tensor([0, 3, 9])).sample
    assert out.shape == x.shape
    assert seen["mid_in"] == (3, 16, 4, 4)  # SiDA's per-position critic features
    assert unet.config.sample_size == 8 and unet.config.in_channels == 1


def test_tiny_unet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        tiny_unet(6, block_out_channels=(8, 16, 32), norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_unet(8, block_out_channels=(12, 16), norm_num_groups=8)
