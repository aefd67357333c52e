import numpy as np
import pytest
import torch

from n2ce_distill.denoisers import load_denoiser
from n2ce_distill.fewstep import FewStepSampler
from n2ce_distill.pipelines import FewStepPipeline, load_sample_source
from n2ce_distill.samplers import few_step_sigmas


@pytest.fixture(params=[("vp_teacher", 1.0, False), ("edm_unet_teacher", 1.0, False), ("toy_teacher", 1.0, False),
                        ("vp_teacher", 0.0, False), ("edm_unet_teacher", 1.0, True)])
def sampler(request):
    teacher, eta, renoise = request.param  # renoise: DMD2's sampler
    denoiser = load_denoiser(request.getfixturevalue(teacher))
    sampler = FewStepSampler(denoiser, few_step_sigmas(denoiser, 3), last_scale=1e-3, eta=eta, renoise=renoise)
    with torch.no_grad():
        sampler.log_scales[:-1] += 0.3  # learned scales must survive the export
    return sampler


def test_export_and_reload_give_the_same_samples(sampler, tmp_path):
    FewStepPipeline.from_sampler(sampler).save_pretrained(tmp_path / "pipe")
    pipe = FewStepPipeline.from_pretrained(tmp_path / "pipe")
    expected = sampler.sample(4, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)
    got = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(got, expected)
    source = load_sample_source(tmp_path / "pipe")
    torch.testing.assert_close(source(4, torch.Generator().manual_seed(7)), expected)


def test_called_like_ddpm_pipeline(vp_teacher, tmp_path):
    denoiser = load_denoiser(vp_teacher)
    FewStepPipeline.from_sampler(FewStepSampler(denoiser, few_step_sigmas(denoiser, 2))).save_pretrained(tmp_path)
    pipe = FewStepPipeline.from_pretrained(tmp_path)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 3 and images[0].size == (8, 8)
    array = pipe(batch_size=2, output_type="np", return_dict=False)[0]
    assert array.shape == (2, 8, 8, 1) and 0 <= array.min() and array.max() <= 1


def test_points_refuse_pil(toy_teacher, tmp_path):
    denoiser = load_denoiser(toy_teacher)
    FewStepPipeline.from_sampler(FewStepSampler(denoiser, few_step_sigmas(denoiser, 2))).save_pretrained(tmp_path)
    pipe = FewStepPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe(batch_size=5, output_type="np").images, np.ndarray)
    with pytest.raises(ValueError, match="output_type: 'pil' needs image samples"):
        pipe(batch_size=2)


def test_teacher_source_needs_steps(vp_teacher, tmp_path):
    with pytest.raises(ValueError, match="needs a number of sampling steps"):
        load_sample_source(vp_teacher)
    x = load_sample_source(vp_teacher, steps=3, method="euler")(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        load_sample_source(tmp_path)


def test_teacher_source_follows_the_requested_spacing(vp_teacher):
    """A VP teacher's default grid is the uniform one; spacing="auto" (DxMI's quadratic) is another schedule."""
    draw = lambda **kw: load_sample_source(vp_teacher, steps=4, **kw)(3, torch.Generator().manual_seed(1))  # noqa: E731
    default = draw()
    torch.testing.assert_close(draw(spacing="uniform"), default, rtol=0, atol=0)
    assert not torch.allclose(draw(spacing="auto"), default)
    torch.testing.assert_close(draw(spacing="auto"), draw(spacing="quadratic"), rtol=0, atol=0)


def test_diffusers_call_conventions(vp_teacher, tmp_path):
    denoiser = load_denoiser(vp_teacher)
    FewStepPipeline.from_sampler(FewStepSampler(denoiser, few_step_sigmas(denoiser, 2))).save_pretrained(tmp_path)
    pipe = FewStepPipeline.from_pretrained(tmp_path)
    run = lambda **kw: pipe(output_type="pt", **kw).images  # noqa: E731
    # one generator per sample: each row is what that generator alone gives, whatever the batch around it
    rows = run(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    for row, seed in zip(rows, (4, 5, 6)):
        torch.testing.assert_close(row, run(batch_size=1, generator=[torch.Generator().manual_seed(seed)])[0])
    assert not torch.equal(rows[0], rows[1])
    with pytest.raises(ValueError, match="a list of 2 generators for batch_size 3"):
        run(batch_size=3, generator=[torch.Generator(), torch.Generator()])
    # the distilled T is the only number of steps; naming it is fine
    torch.testing.assert_close(run(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=2),
                               run(batch_size=2, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="distilled to 2 steps .* got 50"):
        run(batch_size=1, num_inference_steps=50)
    for bad in ("latent", "tensor"):
        with pytest.raises(ValueError, match=rf"output_type: '{bad}' is not one of pil, np, pt"):
            pipe(batch_size=1, output_type=bad)


def test_diffusers_own_loader_finds_the_pipeline(vp_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    denoiser = load_denoiser(vp_teacher)
    FewStepPipeline.from_sampler(FewStepSampler(denoiser, few_step_sigmas(denoiser, 2))).save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert isinstance(pipe, FewStepPipeline)
    ours = FewStepPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(pipe(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images,
                               ours(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images)


def test_sources_state_their_sample_shape_and_fid_reads_it_without_sampling(sampler, vp_teacher, tmp_path):
    from n2ce_distill.fid_inputs import image_shape

    FewStepPipeline.from_sampler(sampler.eval()).save_pretrained(tmp_path / "student")
    for source in (load_sample_source(tmp_path / "student"), load_sample_source(vp_teacher, steps=2)):
        assert source.sample_shape == tuple(source(3, torch.Generator().manual_seed(0)).shape[1:])

    class Expensive:  # a 1000-step teacher, say: the probe must not call it
        sample_shape = (1, 8, 8)

        def __call__(self, n, generator):
            raise AssertionError("sampled only to read a shape")

    assert image_shape(Expensive(), 0, torch.device("cpu")) == (1, 8, 8)
