"""Critic networks: shapes, errors, save/load round trip, and the spatial-sum structure of ConvCritic."""

import pytest
import torch

from n2ce_distill.critics import BottleneckHead, ConvCritic, EncoderFeatures, MLPCritic
from n2ce_distill.errors import InputError
from n2ce_distill.nets import ToyMLP, tiny_unet


def tiny_conv(**kw):
    return ConvCritic(**{"in_channels": 3, "channels": (4, 8), "num_res_blocks": 2, "emb_features": 8,
                         "num_frequencies": 4, **kw})


def tiny_mlp(**kw):
    return MLPCritic(**{"in_features": 6, "hidden_features": 16, "num_layers": 2, "num_frequencies": 4, **kw})


def _inputs(critic, batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 8, 8, generator=g) if isinstance(critic, ConvCritic) else torch.randn(batch, 6, generator=g)
    cond = torch.tensor([0.002, 1.0, 80.0][:batch]) if critic.config.conditioned else None
    return x, cond


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv], ids=["mlp", "conv"])
@pytest.mark.parametrize("conditioned", [False, True])
def test_save_load_round_trip(tmp_path, make, conditioned):
    torch.manual_seed(0)
    critic = make(conditioned=conditioned)
    with torch.no_grad():  # move off the init so a silent re-init on load would be caught
        for p in critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    critic.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(critic).from_pretrained(tmp_path)
    public = lambda cfg: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(critic.config)
    saved, restored = critic.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)  # bit-identical weights
    x, cond = _inputs(critic)
    with torch.no_grad():  # outputs equal up to kernel-path rounding (loaded tensors may differ in alignment)
        torch.testing.assert_close(loaded(x, cond), critic(x, cond), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("conditioned", [False, True])
def test_shapes_and_gradients(conditioned):
    for critic in (tiny_mlp(conditioned=conditioned), tiny_conv(conditioned=conditioned)):
        x, cond = _inputs(critic)
        x.requires_grad_(True)
        out = critic(x, cond)
        assert out.shape == (3,)
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0  # input gradients flow (the sampler learns through grad_x V)


def test_mlp_flattens_any_trailing_shape():
    critic = tiny_mlp()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(critic(x), critic(x.reshape(4, 6)))


def test_conv_accepts_other_resolutions():
    critic = tiny_conv()
    assert critic(torch.randn(2, 3, 16, 16)).shape == (2,)


def test_conditioning_changes_the_output():
    for critic in (tiny_mlp(conditioned=True), tiny_conv(conditioned=True)):
        x, _ = _inputs(critic, batch=1)
        x = x.expand(3, *x.shape[1:])
        out = critic(x, torch.tensor([0.01, 1.0, 50.0]))
        assert out.unique().numel() == 3


def test_linear_cond_scale_accepts_step_index_zero():
    critic = tiny_mlp(conditioned=True, cond_scale="linear")
    out = critic(torch.randn(3, 6), torch.tensor([0.0, 1.0, 2.0]))
    assert torch.isfinite(out).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="needs cond"):
        tiny_mlp(conditioned=True)(torch.randn(2, 6))
    with pytest.raises(ValueError, match="needs cond"):
        tiny_conv(conditioned=True)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="conditioned=False"):
        tiny_mlp()(torch.randn(2, 6), torch.ones(2))
    with pytest.raises(ValueError, match=r"cond must have shape \(2,\)"):
        tiny_conv(conditioned=True)(torch.randn(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_conv()(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_conv()(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="expects 6 features"):
        tiny_mlp()(torch.randn(2, 5))
    with pytest.raises(ValueError, match="activation"):
        tiny_mlp(activation="tanhh")
    with pytest.raises(ValueError, match="cond_scale"):
        tiny_mlp(conditioned=True, cond_scale="sqrt")


def test_default_conv_critic_is_dxmi_shaped():
    critic = ConvCritic()
    widths = [b.conv1.out_channels for b in critic.blocks]
    assert widths == [128, 128, 128, 256, 256, 256]  # 6 res blocks widening 128 -> 256
    assert critic.out.in_features == 256 and critic.out.out_features == 1
    assert "output_scale" in dict(critic.named_parameters())


@pytest.mark.parametrize("downsample", [False, True])
def test_conv_logit_is_extensive_in_area(downsample):
    # With circular padding the network is translation-equivariant on the torus, so the feature map of a
    # 2x2-tiled image is the tiled feature map. The spatial sum then quadruples: l - s*b scales by 4.
    torch.manual_seed(0)
    critic = tiny_conv(padding_mode="circular", downsample=downsample, output_scale_init=0.5)
    x = torch.randn(2, 3, 8, 8)
    tiled = x.repeat(1, 1, 2, 2)
    with torch.no_grad():
        offset = critic.output_scale * critic.out.bias
        torch.testing.assert_close(critic(tiled) - offset, 4 * (critic(x) - offset), rtol=1e-4, atol=1e-5)
        # translation invariance by a multiple of the total downsampling factor (exact: a spatial sum)
        torch.testing.assert_close(critic(x.roll((2, 4), dims=(2, 3))), critic(x), rtol=1e-4, atol=1e-6)


def test_output_scale_is_learned_and_multiplies_the_logit():
    critic = tiny_conv()
    x = torch.randn(2, 3, 8, 8)
    critic(x).sum().backward()
    assert critic.output_scale.grad is not None and critic.output_scale.grad != 0
    with torch.no_grad():
        base = critic(x)
        critic.output_scale.mul_(3.0)
        torch.testing.assert_close(critic(x), 3.0 * base)



def test_a_critic_saved_with_a_scalar_output_scale_loads_into_the_one_element_parameter():
    """``output_scale`` has one element (FSDP2 shards no 0-d parameter); a checkpoint saved when it was a scalar
    still loads (``--resume`` loads through ``load_state_dict``), to the same logits."""
    critic = tiny_conv(output_scale_init=0.5)
    x = torch.randn(2, 3, 8, 8)
    state = critic.state_dict() | {"output_scale": torch.tensor(0.25)}
    reloaded = tiny_conv()
    reloaded.load_state_dict(state)
    assert reloaded.output_scale.shape == (1,) and reloaded.output_scale.item() == 0.25
    with torch.no_grad():
        critic.output_scale.fill_(0.25)
        torch.testing.assert_close(reloaded(x), critic(x))


def test_a_critic_folder_saved_with_a_scalar_output_scale_loads_through_from_pretrained(tmp_path):
    """diffusers' ``from_pretrained`` checks shapes before any ``load_state_dict`` hook runs; it failed on a
    folder saved when ``output_scale`` was a scalar."""
    from safetensors.torch import load_file, save_file

    tiny_conv(output_scale_init=0.5).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(weights)) | {"output_scale": torch.tensor(0.25)}, str(weights))
    for low_cpu_mem_usage in (True, False):
        reloaded = ConvCritic.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert reloaded.output_scale.shape == (1,) and reloaded.output_scale.item() == 0.25

# ---------------------------------------------------------------------------------- encoder critics (SiDA, DMD2)

@pytest.mark.parametrize("size, mid", [(8, 4), (16, 8)])
def test_encoder_features_are_the_mid_block_input(size, mid):
    """EncoderFeatures holds the mid block's input of the net's latest forward, at the mid block's resolution."""
    torch.manual_seed(0)
    unet = tiny_unet(size, 1, block_out_channels=(8, 16), norm_num_groups=4)
    encoder = EncoderFeatures(unet, "method.adversarial")
    with pytest.raises(RuntimeError, match="has not run"):
        encoder.read()
    seen = []
    unet.mid_block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        unet(torch.randn(3, 1, size, size), torch.tensor([10, 500, 900]))
        assert encoder.read().shape == (3, 16, mid, mid)
        torch.testing.assert_close(encoder.read(), seen[0], rtol=0, atol=0)
        unet(torch.randn(2, 1, size, size), torch.tensor([10, 500]))
    assert encoder.read().shape[0] == 2  # the latest pass


def test_encoder_features_need_a_mid_block():
    with pytest.raises(InputError, match=r"^method\.adversarial: .*mid block"):
        EncoderFeatures(ToyMLP(2), "method.adversarial")


@pytest.mark.parametrize("channels, h", [(16, 4), (64, 2), (48, 8)])
def test_bottleneck_head_starts_at_zero_and_reads_any_size(channels, h):
    """One logit per sample at any bottleneck size; 0 at initialisation (ratio 1), and its read-out is the only
    thing that learns at the first step (zero read-out weights give the convolution no gradient yet)."""
    torch.manual_seed(0)
    head = BottleneckHead(channels)
    features = torch.randn(5, channels, h, h)
    logits = head(features)
    assert logits.shape == (5,) and torch.equal(logits, torch.zeros(5))
    logits.sum().backward()
    assert head.out.weight.grad.abs().sum() > 0
    assert head.conv.weight.grad.abs().sum() == 0
    assert sum(p.numel() for p in head.parameters()) == 9 * channels**2 + 4 * channels + 1


def test_bottleneck_head_is_translation_invariant_on_the_torus():
    """The spatial mean makes the logit ignore where a feature sits (with circular padding, exactly)."""
    torch.manual_seed(0)
    head = BottleneckHead(8)
    head.conv.padding_mode = "circular"
    torch.nn.init.normal_(head.out.weight)
    features = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(head(features), head(features.roll(shifts=(1, 2), dims=(2, 3))))
