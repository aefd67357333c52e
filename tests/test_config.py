import pytest

from n2ce_distill.config import ConfigError, DxMIConfig, RecipeConfig, load_recipe, parse_overrides
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(recipe_file, vp_teacher):
    return recipe_file({"method": {"name": "dxmi"}, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}})


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, vp_teacher):
    """Hub teachers and data folders do not exist here; everything else in the recipe must validate."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    overrides = [f"teacher.path={vp_teacher}"] if "teacher" in raw else []
    if raw["data"]["name"] in ("image-folder", "cifar10"):
        overrides += ["data.name=digits", "data.root=null", "data.image_size=null", "data.caption_column=null"]
    if raw["data"]["name"] == "prompts":
        overrides += [f"data.root={path}"]  # any file stands in for the prompt file
    recipe = load_recipe(path, overrides)
    assert recipe.method.name in path.stem or recipe.method.name == "teacher"


def test_overrides_are_nested_and_typed():
    assert parse_overrides(["critic.objective=nce", "train.max_steps=10", "train.ema.beta=0.5"]) == {
        "critic": {"objective": "nce"},
        "train": {"max_steps": 10, "ema": {"beta": 0.5}},
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["critic.objective"])


def test_one_key_swaps_the_objective(base):
    assert load_recipe(base).critic.objective == "n2ce"
    assert load_recipe(base, ["critic.objective=nce"]).critic.objective == "nce"


@pytest.mark.parametrize(
    "override, message",
    [
        ("critic.objectve=nce", "critic.objectve: unknown key; did you mean 'critic.objective'?"),
        ("method.tau3=1", "method.tau3: unknown key; did you mean 'method.tau2'?"),
        ("train.ema.bta=0.9", "train.ema.bta: unknown key; did you mean 'train.ema.beta'?"),
        ("critic.M=0", "critic.M: Input should be greater than 0"),
        ("critic.M=-3", "critic.M: Input should be greater than 0"),
        ("method.num_steps=0", "method.num_steps: Input should be greater than or equal to 1"),
        ("method.sampler_steps_from=4", "method.sampler_steps_from: must be below method.num_steps (4)"),
        ("optim.critic.lr=0", "optim.critic.lr: Input should be greater than 0"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
        ("train.batch_size=many", "train.batch_size: Input should be a valid integer"),
        ("critic.objective=bce", "critic.objective: unknown objective 'bce'; choose from cd, gan, n2ce, nce, nwj"),
        ("teacher.path=assets/missing-teacher", "teacher.path: folder 'assets/missing-teacher' not found"),
        ("data.name=image-folder", "data.root: the image-folder data set needs a folder"),
        ("seed=-5", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than 4294967296"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(base, override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(base, [override])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("old, new", [
    ("train.lr=1e-4", "optim.sampler.lr"), ("critic.lr=1e-3", "optim.critic.lr"), ("method.value_lr=1e-3", "optim.value.lr"),
    ("method.log_scale_lr=1e-3", "optim.log_scales.lr"), ("train.adam_betas=[0,0.9]", "optim.<net>.betas"),
])
def test_a_moved_optimiser_key_points_to_its_new_place(base, old, new):
    with pytest.raises(ConfigError) as info:
        load_recipe(base, [old])
    assert str(info.value).startswith(f"{old.partition('=')[0]}: moved to {new} ")
    assert "sampler, log_scales, critic, value" in str(info.value)


def test_every_trained_network_gets_its_optimiser_settings(base):
    recipe = load_recipe(base, ["optim.critic.lr=3e-3", "optim.value.betas=[0.5,0.9]"])
    assert list(recipe.optim) == ["sampler", "log_scales", "critic", "value"]
    assert recipe.optim["critic"].lr == 3e-3 and recipe.optim["critic"].betas == (0.9, 0.999)
    assert recipe.optim["value"].lr == DxMIConfig.optimized["value"] and recipe.optim["value"].betas == (0.5, 0.9)
    assert RecipeConfig.model_validate(recipe.resolved()).optim == recipe.optim  # the stored recipe validates again
    shared = load_recipe(base, ["method.share_value=true"])
    assert "value" not in shared.optim
    with pytest.raises(ConfigError, match=r"^optim.value: method 'dxmi' trains no such network \(it trains sampler, "
                                          r"log_scales, critic\)$"):
        load_recipe(base, ["method.share_value=true", "optim.value.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^optim.critic.betas.0: Input should be less than 1"):
        load_recipe(base, ["optim.critic.betas=[1,0.9]"])


def test_missing_image_folder_is_named(base, tmp_path):
    with pytest.raises(ConfigError, match="data.root: folder .* not found"):
        load_recipe(base, ["data.name=image-folder", f"data.root={tmp_path / 'nope'}"])


def test_hub_ids_pass_validation_but_local_looking_paths_must_exist(base):
    assert load_recipe(base, ["teacher.path=google/ddpm-cifar10-32"]).teacher.path == "google/ddpm-cifar10-32"


def test_distillation_needs_a_teacher(recipe_file):
    path = recipe_file({"method": {"name": "sid"}, "data": {"name": "digits"}})
    with pytest.raises(ConfigError, match="teacher: method 'sid' distils a teacher"):
        load_recipe(path)


def test_file_problems_are_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_critic_keys_a_method_does_not_read_are_refused(recipe_file, vp_teacher):
    sid = recipe_file({"method": {"name": "sid"}, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}})
    with pytest.raises(ConfigError, match=r"^critic.lr: not used by method 'sid' \(each network's lr and betas are set "
                                          r"under optim.<net>; this method trains generator, fake_score\)$"):
        load_recipe(sid, ["critic.lr=1e-3"])
    for key in ("channels=[8, 16]", "hidden_features=16"):
        with pytest.raises(ConfigError, match=rf"^critic.{key.split('=')[0]}: not used by method 'sid' \(it reads "
                                              r"critic.M, critic.objective, critic.ratio_reg\)$"):
            load_recipe(sid, [f"critic.{key}"])
    assert load_recipe(sid, ["critic.objective=nce", "critic.ratio_reg=0.5"]).critic.ratio_reg == 0.5
    teacher = recipe_file({"method": {"name": "teacher"}, "data": {"name": "digits"}, "critic": {"objective": "nce"}})
    with pytest.raises(ConfigError, match="^critic: method 'teacher' trains no critic; remove the critic section$"):
        load_recipe(teacher)


def test_an_objective_parameter_under_another_objective_is_named_and_the_resolved_recipe_reloads(base, tmp_path):
    import yaml

    swapped = load_recipe(base, ["critic.M=7", "critic.objective=cd"])
    assert swapped.unused_keys() == ["critic.M: not used by objective 'cd'; ignored"]
    assert load_recipe(base, ["critic.M=7"]).unused_keys() == [] and load_recipe(base, ["critic.objective=nce"]).unused_keys() == []
    for recipe in (swapped, load_recipe(REPO / "recipes" / "digits_sid_n2ce.yaml", [f"teacher.path={base.parent}"])):
        again = tmp_path / "resolved.yaml"
        again.write_text(yaml.safe_dump(recipe.resolved()))
        assert load_recipe(again) == recipe  # what a run stores is a recipe that validates to the same thing
