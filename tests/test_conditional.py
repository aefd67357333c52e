"""Class-conditional data, teachers, guidance, loops, pipelines and metrics (labels end to end)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler

from n2ce_distill.cli import main
from n2ce_distill.config import load_recipe
from n2ce_distill.critics import ConvCritic, MLPCritic
from n2ce_distill.data import (ArrayDataset, Checkerboard, EightGaussians, ImageFolderDataset, TwoSpirals,
                               balanced_labels, build_dataset, infinite_loader)
from n2ce_distill.denoisers import VPDenoiser, load_denoiser
from n2ce_distill.errors import InputError
from n2ce_distill.methods import build_method
from n2ce_distill.nets import tiny_unet
from n2ce_distill.pipelines import FewStepPipeline
from n2ce_distill.trainer import Trainer

SHRINK = ["train.batch_size=8", "critic.channels=[8, 16]", "critic.num_res_blocks=2"]


# ---------------------------------------------------------------------------------------------- data

@pytest.mark.parametrize("cls", [EightGaussians, TwoSpirals, Checkerboard])
def test_toy_labels_come_with_the_same_draws(cls):
    """``sample`` is ``sample_labelled`` without its labels, draw for draw: unlabelled toys are unchanged."""
    a = cls().sample(500, torch.Generator().manual_seed(3))
    b, labels = cls().sample_labelled(500, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert labels.dtype == torch.long and labels.shape == (500,)
    assert set(labels.tolist()) == set(range(cls.num_classes))


def test_toy_labels_name_the_mode_or_square():
    x, k = EightGaussians().sample_labelled(2000, torch.Generator().manual_seed(0))
    nearest = torch.cdist(x.double(), EightGaussians().centers).argmin(1)
    assert (nearest == k).float().mean() > 0.99  # the modes are 8 std apart: only tails cross
    x, square = Checkerboard().sample_labelled(2000, torch.Generator().manual_seed(0))
    for s in range(8):  # each label is one unit square (of side 2 after the scale), and none is shared
        points = x[square == s]
        assert (points.max(0).values - points.min(0).values <= 2 + 1e-6).all()
    x, arm = TwoSpirals().sample_labelled(1000, torch.Generator().manual_seed(0))
    assert torch.allclose(x[arm == 0].mean(0), -x[arm == 1].mean(0), atol=0.1)  # the arms mirror each other


def test_labelled_datasets_count_their_classes(tmp_path):
    assert build_dataset("digits", labels=True).num_classes == 10
    assert build_dataset("digits").num_classes is None
    assert build_dataset("8gaussians", n=64, labels=True).num_classes == 8
    from PIL import Image

    for name in ("cat", "dog", "eel"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "a.png")
    folder = ImageFolderDataset(tmp_path, 4, labels=True)
    assert folder.num_classes == 3 and [int(folder[i][1]) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ArrayDataset(torch.zeros(2, 1), torch.tensor([0, 3]), num_classes=3)


def test_loader_carries_labels_with_their_images():
    ds = build_dataset("digits", labels=True)
    x, y = next(infinite_loader(ds, 16, seed=0))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    index = [int((ds.x == image).flatten(1).all(1).nonzero()[0]) for image in x]
    assert torch.equal(ds.y[index], y)


def test_balanced_labels():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


# ---------------------------------------------------------------------------------------------- denoiser

def test_guidance_is_the_affine_mix_of_conditional_and_null(vp_cond_teacher):
    teacher = load_denoiser(vp_cond_teacher)
    assert teacher.num_classes == 10 and teacher.null_class == 10  # round trip through model_index.json
    with torch.no_grad():  # an untrained net's class table is random, so the two branches differ
        teacher.net.class_embedding.weight.normal_()
    x, sigma, y = torch.randn(4, 1, 8, 8), torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        conditional, null = teacher(x, sigma, y), teacher(x, sigma, torch.full_like(y, 10))
        assert torch.allclose(teacher.guided(x, sigma, y, 1.0), conditional)
        assert torch.allclose(teacher.guided(x, sigma, y, 0.0), null, atol=1e-6)
        assert torch.allclose(teacher.guided(x, sigma, y, 3.0), null + 3 * (conditional - null), atol=1e-5)
        assert not torch.allclose(conditional, null)


def test_edm_conditional_teacher_round_trips_its_classes(tmp_path):
    from n2ce_distill.denoisers import EDMDenoiser

    net = tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=6)
    EDMDenoiser(net, null_class=5).save_pretrained(tmp_path)
    teacher = load_denoiser(tmp_path)
    assert type(teacher) is EDMDenoiser and teacher.num_classes == 5 and teacher.null_class == 5
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        teacher.net.class_embedding.weight.normal_()
        assert not torch.allclose(teacher(x, 1.0, torch.tensor([0, 1])), teacher(x, 1.0, torch.tensor([2, 3])))


def test_guidance_needs_a_null_class():
    net = tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=10)
    teacher = VPDenoiser(net, DDPMScheduler())
    assert teacher.num_classes == 10 and teacher.null_class is None
    with pytest.raises(InputError, match="no null class"):
        teacher.guided(torch.randn(2, 1, 8, 8), 1.0, torch.tensor([0, 1]), 2.0)


# ---------------------------------------------------------------------------------------------- critics

@pytest.mark.parametrize("critic,x", [(ConvCritic(1, (8, 16), 2, num_classes=10), torch.randn(4, 1, 8, 8)),
                                      (MLPCritic(2, 16, 2, num_classes=10), torch.randn(4, 2))])
def test_projection_critic_starts_unconditional_and_reads_labels(critic, x):
    y = torch.tensor([0, 1, 2, 3])
    plain = type(critic)(**{**critic.config, "num_classes": None})
    plain.load_state_dict({k: v for k, v in critic.state_dict().items() if "condition_projection" not in k})
    assert torch.equal(critic(x, class_labels=y), plain(x))  # e_y = 0 at first
    with torch.no_grad():
        critic.condition_projection.weight.normal_()
    assert not torch.allclose(critic(x, class_labels=y), critic(x, class_labels=y.flip(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        critic(x)
    with pytest.raises(ValueError, match="built unconditional"):
        plain(x, class_labels=y)


# ---------------------------------------------------------------------------------------------- loops

def plain_update(method):
    """A minimal ``Trainer._update``: backward into the optimiser's own parameters, step, zero."""
    optimizers = method.optimizers()

    def update(term, loss, clip=None):
        owned = [p for group in optimizers[term].param_groups for p in group["params"] if p.requires_grad]
        loss.backward(inputs=owned)
        optimizers[term].step()
        optimizers[term].zero_grad(set_to_none=True)

    return update


def _spy_on_networks(method) -> dict[str, list]:
    """Record, for every network a method owns, the class labels of each call of its innermost model."""
    from diffusers import ModelMixin

    seen: dict[str, list] = {}
    for owner, module in {**method.nets.read, **method.frozen}.items():
        for name, model in module.named_modules():
            if isinstance(model, ModelMixin):
                key = f"{owner}.{name}" if name else owner
                seen[key] = []

                def hook(_, args, kwargs, key=key):
                    labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
                    seen[key].append((args[0].shape[0], None if labels is None else labels.clone()))

                model.register_forward_pre_hook(hook, with_kwargs=True)
                break  # the outermost model of this network
    return seen


CONDITIONAL = {
    "dxmi": ({"name": "dxmi", "num_steps": 2, "sampler_steps_from": 0}, SHRINK),
    "sid": ({"name": "sid", "adversarial": True}, ["train.batch_size=8"]),
    "dmd2": ({"name": "dmd2", "num_steps": 2, "adversarial": True}, ["train.batch_size=8"]),
}


@pytest.mark.parametrize("name", CONDITIONAL)
def test_labels_reach_every_network(name, recipe_file, vp_cond_teacher):
    """Every network of a conditional loop is called with the labels of the rows it sees, in every call: a
    network that ignored them (called without labels, or with another row's) fails this test."""
    section, shrink = CONDITIONAL[name]
    path = recipe_file({"method": section, "data": {"name": "digits", "labels": True},
                        "teacher": {"path": str(vp_cond_teacher), "guidance_scale": 2.0}})
    recipe = load_recipe(path, shrink)
    torch.manual_seed(0)
    method = build_method(recipe, build_dataset("digits", labels=True))
    seen = _spy_on_networks(method)
    x, labels = next(infinite_loader(build_dataset("digits", labels=True), 8))
    method.training_step(x, 0, plain_update(method), labels=labels)
    assert seen and all(seen.values()), {k: len(v) for k, v in seen.items()}  # every network ran
    for key, calls in seen.items():
        for rows, got in calls:
            assert got is not None, f"{key} was called without labels"
            assert len(got) == rows
            assert set(got.tolist()) <= set(labels.tolist()) | {10}, key  # the batch's labels (or the null class)
    if name in ("sid", "dmd2"):  # guidance: the teacher also sees the null class
        assert any((got == 10).any() for _, got in seen["teacher.net"])


def test_label_mismatches_are_one_line_errors(recipe_file, vp_teacher, vp_cond_teacher):
    def build(teacher, labels, **extra):
        path = recipe_file({"method": {"name": "dxmi"}, "data": {"name": "digits", "labels": labels},
                            "teacher": {"path": str(teacher), **extra}})
        return build_method(load_recipe(path, SHRINK), build_dataset("digits", labels=labels))

    with pytest.raises(InputError, match="data.labels: teacher .* is class-conditional \\(10 classes\\)"):
        build(vp_cond_teacher, False)
    with pytest.raises(InputError, match="data.labels: teacher .* is unconditional"):
        build(vp_teacher, True)
    with pytest.raises(InputError, match="teacher.guidance_scale: .* unconditional"):
        build(vp_teacher, False, guidance_scale=2.0)
    path = recipe_file({"method": {"name": "dxmi"}, "data": {"name": "8gaussians", "labels": True},
                        "teacher": {"path": str(vp_cond_teacher)}})
    with pytest.raises(InputError, match="data.image_size"):  # the shape is checked first
        build_method(load_recipe(path, SHRINK), build_dataset("8gaussians", n=16, labels=True))


def test_class_count_mismatch(recipe_file, toy_cond_teacher):
    path = recipe_file({"method": {"name": "dxmi"}, "data": {"name": "spirals", "labels": True},
                        "teacher": {"path": str(toy_cond_teacher)}})
    with pytest.raises(InputError, match="the data has 2 classes but teacher .* was trained on 8"):
        build_method(load_recipe(path, SHRINK), build_dataset("spirals", n=16, labels=True))


def test_teacher_training_drops_labels_to_the_null_class(recipe_file, tmp_path):
    path = recipe_file({"method": {"name": "teacher", "net": {"label_dropout": 0.25, "block_out_channels": [8, 16]}},
                        "data": {"name": "digits", "labels": True}})
    recipe = load_recipe(path, ["train.batch_size=1000", "train.max_steps=1", "train.sample_every=1",
                                "train.checkpoint_every=1"])
    method = build_method(recipe, build_dataset("digits", labels=True))
    assert method.nets.read["denoiser"].num_classes == 10 and method.nets.read["denoiser"].null_class == 10
    seen = _spy_on_networks(method)
    x, labels = next(infinite_loader(build_dataset("digits", labels=True), 1000))
    method.training_step(x, 0, plain_update(method), labels=labels)
    (_, got), = seen["denoiser.net"]
    dropped = got == 10
    assert 0.2 < dropped.float().mean() < 0.3  # 1000 draws of p = 0.25
    assert torch.equal(got[~dropped], labels[~dropped])
    final = Trainer(recipe, tmp_path / "run").train()
    assert load_denoiser(final).null_class == 10


# ---------------------------------------------------------------------------------------------- pipeline, CLI

@pytest.fixture(scope="module")
def cond_student(tmp_path_factory, vp_cond_teacher):
    """A conditional DxMI student exported after two steps, with guidance 2."""
    root = tmp_path_factory.mktemp("cond_student")
    (root / "recipe.yaml").write_text(json.dumps({
        "method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits", "labels": True},
        "teacher": {"path": str(vp_cond_teacher), "guidance_scale": 2.0}}))
    recipe = load_recipe(root / "recipe.yaml", [*SHRINK, "train.max_steps=2", "train.sample_every=2",
                                                "train.checkpoint_every=2"])
    return Trainer(recipe, root / "run").train()


def test_pipeline_takes_class_labels_like_dit(cond_student):
    pipe = FewStepPipeline.from_pretrained(str(cond_student))
    assert pipe.few_step.config.guidance_scale == 2.0 and pipe.few_step.config.null_class == 10
    images = pipe(class_labels=[1, 2, 3], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (3, 1, 8, 8)
    again = pipe(class_labels=torch.tensor([1, 2, 3]), output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again.images)
    unguided = pipe(class_labels=[1, 2, 3], guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(images, unguided)
    for bad, message in (({}, "class-conditional"), ({"class_labels": [10]}, r"\[0, 10\)"),
                         ({"class_labels": [1, 2], "batch_size": 3}, "2 labels for batch_size 3")):
        with pytest.raises(InputError, match=message):
            pipe(output_type="pt", **bad)


def test_sample_cli_writes_each_images_class(cond_student, tmp_path, capsys):
    assert main(["sample", str(cond_student), "--num-samples", "5", "--class-labels", "4,7", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "labels.json").read_text()) == [4, 7, 4, 7, 4]
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 5
    assert main(["sample", str(cond_student), "--class-labels", "12", "--out", str(tmp_path / "bad")]) == 2
    assert "--class-labels: each label must lie in [0, 10)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_fid_reports_label_fidelity_and_per_class_fid(vp_cond_teacher, tmp_path):
    from n2ce_distill.evaluation import evaluate_inputs

    table = evaluate_inputs([f"{vp_cond_teacher}@2:euler"], "digits", num_samples=40, out=tmp_path, batch_size=20)
    row, = json.loads((tmp_path / "fid.json").read_text())
    assert "label_fidelity" in table and "fid_class_mean" in table
    assert len(row["fid_per_class"]) == 10 and len(row["label_fidelity_per_class"]) == 10
    assert 0 <= row["label_fidelity"] <= 1 and row["num_samples"] == 40


def test_label_fidelity_of_the_data_itself():
    """The reference's own images, replayed as a source with their true labels, score the classifier's accuracy."""
    from n2ce_distill.fid import evaluate_classes
    from n2ce_distill.fid_inputs import load_named_labels, load_named_reference

    images, labels = load_named_reference("digits").float() / 127.5 - 1, load_named_labels("digits")

    class Data:
        num_classes, sample_shape = 10, (1, 8, 8)
        drawn = {c: 0 for c in range(10)}

        def __call__(self, n, generator, class_labels):
            c = int(class_labels[0])
            rows = images[labels == c][self.drawn[c]:self.drawn[c] + n]
            self.drawn[c] += n
            return rows

    metrics = evaluate_classes(Data(), "digits", num_samples=1700, batch_size=100)
    assert metrics["label_fidelity"] > 0.98  # the shipped classifier: 0.99 on held-out digits
    assert metrics["fid"] < 1.0  # 1700 of the 1797 reference images
