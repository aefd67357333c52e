"""DxMI method: value decomposition V = -l + U, training step, velocity buffer, critic objective choice."""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Annotated

import pytest
import torch
from annotated_types import Ge

from n2ce_distill.config import ConfigError, load_recipe
from n2ce_distill.methods.dxmi import SAMPLER_CLIP, DxMI
from n2ce_distill.objectives import CD, N2CE, NCE, NWJ, OBJECTIVES, CriticObjective

SHAPE = (1, 8, 8)  # digits
B = 8
TINY = ["train.batch_size=8", "critic.channels=[8, 16]", "critic.num_res_blocks=2",
        "critic.hidden_features=16", "critic.num_layers=2"]


@pytest.fixture
def make_dxmi(recipe_file, vp_teacher):
    """Build a DxMI on the tiny 8x8 VP teacher (T = 2) with extra dotted overrides."""

    def make(*overrides: str) -> DxMI:
        path = recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                            "teacher": {"path": str(vp_teacher)}})
        torch.manual_seed(0)
        return DxMI(load_recipe(path, [*TINY, *overrides]), SHAPE)

    return make


def make_update(method, calls: list):
    """A minimal ``Trainer._update``: backward into the optimiser's own parameters, clip, step, zero."""
    opts = method.optimizers()

    def update(optimizer, loss, clip=None):  # the optimiser's name is the term's
        term = optimizer
        assert torch.isfinite(loss).all(), term
        calls.append((term, optimizer, clip, loss.detach()))
        opt = opts[optimizer]
        owned = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        loss.backward(inputs=owned)
        torch.nn.utils.clip_grad_norm_([p for p in owned if p.grad is not None], clip or 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def data_batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, *SHAPE, generator=g) * 2 - 1


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


def all_steps(T: int) -> list[torch.Tensor]:
    return [torch.full((B,), k, dtype=torch.long) for k in range(T + 1)]


# ---------------------------------------------------------------------------------------------- value

def test_fresh_value_is_minus_critic_at_every_step(make_dxmi):
    """U's read-out starts at zero, so V(x, k) = -l(x) exactly for every k, terminal step included."""
    method = make_dxmi()
    assert "value" in method.nets
    out = method.nets.read["value"].out
    assert torch.count_nonzero(out.weight) == 0 and torch.count_nonzero(out.bias) == 0
    x = data_batch(2)
    with torch.no_grad():
        energy = -method.nets.read["critic"](x)
        assert energy.abs().max() > 0  # the comparison below is not between two zeros
        for k in all_steps(2):
            assert torch.equal(method.value(x, k), energy)
        mixed = torch.arange(B) % 3  # rows at different steps in one batch
        assert torch.equal(method.value(x, mixed), energy)


def test_value_update_learns_correction_but_terminal_stays_energy(make_dxmi):
    """After one TD update U != 0 for k < T, V = -l + U there, and V(x, T) is still exactly -l(x)."""
    method = make_dxmi()
    torch.manual_seed(3)
    method.training_step(data_batch(), 0, make_update(method, []))
    x = data_batch(4)
    T = method.recipe.method.num_steps
    with torch.no_grad():
        energy = -method.nets.read["critic"](x)
        for k in all_steps(T)[:-1]:
            correction = method.nets.read["value"](x, k.float())
            assert correction.abs().min() > 0, f"U is still zero at k={int(k[0])}"
            torch.testing.assert_close(method.value(x, k), energy + correction, rtol=0, atol=0)
        assert torch.equal(method.value(x, torch.full((B,), T)), energy)


def test_u_is_computed_only_on_the_rows_that_read_it(make_dxmi):
    """In a batch mixing steps, U runs on the rows with k < T only (at k = T it is 0 by definition), and every row
    gets what the per-step formula gives it."""
    method = make_dxmi()
    method.training_step(data_batch(), 0, make_update(method, []))  # U != 0 after one TD update
    T = method.recipe.method.num_steps
    x, k = data_batch(5), torch.arange(B) % (T + 1)
    seen = []
    handle = method.nets.read["value"].register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    with torch.no_grad():
        mixed = method.value(x, k)
    handle.remove()
    assert seen == [int((k < T).sum())] and seen[0] < B
    with torch.no_grad():
        energy = -method.nets.read["critic"](x)
        expected = torch.where(k == T, energy, energy + method.nets.read["value"](x, k.float()))
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)


def test_read_networks_build_no_graph_for_their_weights(make_dxmi):
    """The sampler's loss reads the critic and U: inside reading() their weights require no gradient (no graph is
    kept for them), and afterwards they train again."""
    method = make_dxmi()
    critic = method.nets.read["critic"]
    with method.reading(critic):
        assert not any(p.requires_grad for p in critic.parameters())
        x = data_batch().requires_grad_(True)
        critic(x).sum().backward()
        assert x.grad is not None and all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())


def test_shared_value_has_no_value_net(make_dxmi):
    """share_value: no U network, no value optimiser or loss, and V(x, k) = -l(x) for all k."""
    method = make_dxmi("method.share_value=true")
    assert "value" not in method.nets and "value" not in method.optimizers()
    calls = []
    torch.manual_seed(3)
    logs = method.training_step(data_batch(), 0, make_update(method, calls)).scalars
    assert "loss_value" not in logs
    assert sorted(c[1] for c in calls) == ["critic", "sampler"]
    x = data_batch(4)
    with torch.no_grad():
        energy = -method.nets.read["critic"](x)
        for k in all_steps(2):
            assert torch.equal(method.value(x, k), energy)


# ---------------------------------------------------------------------------------------------- step

@pytest.mark.parametrize("objective", ["cd", "nce", "n2ce"])
def test_training_step_updates_every_network(make_dxmi, objective):
    """One step: finite logs, one update per optimiser, critic/value/sampler (and learnt log-scales) move."""
    method = make_dxmi(f"critic.objective={objective}")
    sampler = method.nets.read["sampler"]
    before = {name: snapshot(net) for name, net in method.nets.read.items()}
    calls = []
    torch.manual_seed(3)
    logs = method.training_step(data_batch(), 0, make_update(method, calls)).scalars

    assert {"loss_critic", "loss_sampler", "loss_value"} <= set(logs)
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert Counter(c[1] for c in calls) == Counter(list(method.optimizers()))  # each optimiser exactly once
    assert [c[0] for c in calls] == ["critic", "value", "sampler"]
    assert [c[2] for c in calls] == [None, None, SAMPLER_CLIP]

    assert changed(before["critic"], method.nets.read["critic"])
    # the zero read-out gives every inner weight of U a zero gradient on the first step: only it moves
    assert changed(before["value"], method.nets.read["value"]) == {"out.weight", "out.bias"}
    moved = changed(before["sampler"], sampler)
    assert "log_scales" in moved and any(name.startswith("denoiser.") for name in moved)
    old, new = before["sampler"]["log_scales"], sampler.log_scales.detach()
    assert (old[:-1] != new[:-1]).all(), "a learnt per-step scale did not move"
    assert old[-1] == new[-1], "the fixed last scale must get no gradient"
    assert torch.equal(sampler.scales()[-1], torch.tensor(method.recipe.method.last_scale))
    # one logged scale per step, read after this step's update (a single Adam step moves log s by ~1e-5, so
    # only exact equality tells the updated scales from the old ones)
    T = method.recipe.method.num_steps
    logged = torch.stack([logs[f"scale_{k}"] for k in range(T)])
    assert torch.equal(logged, sampler.scales().detach())
    assert not torch.equal(logged[:-1], old[:-1].exp())


def test_velocity_buffer_and_value_loss_match_the_trajectory(make_dxmi):
    """v_k <- m * 1 + (1 - m) mean squared step; loss_value = E (l(x_{k+1}) - l(x_k))^2 over k >= 1 while U = 0
    (V(., 0) is read by nothing, so TD leaves it out)."""
    method = make_dxmi()
    m = method.recipe.method.velocity_momentum
    T = method.recipe.method.num_steps
    assert torch.equal(method.velocity, torch.ones(T))
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with torch.no_grad():  # the trajectory the step will draw from the same RNG state
        traj = method.nets.read["sampler"].sample(B, return_trajectory=True, noise=lambda s: torch.randn(s))
    assert traj.shape == (T + 1, B, *SHAPE)
    torch.set_rng_state(state)
    logs = method.training_step(data_batch(), 0, make_update(method, [])).scalars

    sq_step = (traj[1:] - traj[:-1]).pow(2).flatten(2).mean(2).mean(1)
    assert method.velocity.shape == (T,) and (method.velocity > 0).all()
    torch.testing.assert_close(method.velocity, m * torch.ones(T) + (1 - m) * sq_step)
    assert ((method.velocity - 1).sign() == (sq_step - 1).sign()).all()  # moved toward the measured steps

    # the critic is updated before the value loss is formed, and U is still 0 then; it sees clamped images
    with torch.no_grad():
        l = method.nets.read["critic"](traj.flatten(0, 1).clamp(-1, 1)).view(T + 1, B)
    assert method.first_value_step == 1
    torch.testing.assert_close(logs["loss_value"], (l[2:] - l[1:-1]).pow(2).mean(), rtol=1e-5, atol=1e-7)


def test_critic_judges_images_as_exported(make_dxmi):
    """The critic step and V see clamp(x, -1, 1): what the pipeline exports, on the data's own range."""
    method = make_dxmi("method.share_value=true")
    critic_before = copy.deepcopy(method.nets.read["critic"])
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with torch.no_grad():
        final = method.nets.read["sampler"].sample(B, noise=lambda s: torch.randn(s))
    assert (final.abs() > 1).any()  # the samples leave the data range, so the clamp is not a no-op
    torch.set_rng_state(state)
    _, logits_noise = method.training_step(data_batch(), 0, make_update(method, [])).critic_logits
    with torch.no_grad():
        clamped, raw = critic_before(final.clamp(-1, 1)), critic_before(final)
    assert (clamped - raw).abs().max() > 1e-5  # far above the tolerance below
    torch.testing.assert_close(logits_noise, clamped, rtol=1e-6, atol=1e-7)

    x, k = data_batch(2) * 3, torch.zeros(B, dtype=torch.long)  # most pixels outside [-1, 1]
    with torch.no_grad():
        assert torch.equal(method.value(x, k), -method.nets.read["critic"](x.clamp(-1, 1)))
        assert not torch.equal(method.value(x, k), -method.nets.read["critic"](x))


def test_sampler_steps_from_trains_only_later_steps(make_dxmi):
    """From step 1 of 2: s_0 only shapes step 0's transition, so it stays; the shared denoiser still learns."""
    method = make_dxmi("method.sampler_steps_from=1")
    sampler = method.nets.read["sampler"]
    before = snapshot(sampler)
    torch.manual_seed(3)
    method.training_step(data_batch(), 0, make_update(method, []))
    moved = changed(before, sampler)
    assert "log_scales" not in moved
    assert any(name.startswith("denoiser.") for name in moved)


@pytest.mark.parametrize("overrides, trained", [
    (["method.sampler_steps_from=1"], False),  # the sampler reads only V(x_T, T) = -l: U is never read
    ([], True),  # sampler_steps_from = 0: the sampler reads V(x_1, 1)
])
def test_value_trains_only_where_it_is_read(make_dxmi, overrides, trained):
    method = make_dxmi(*overrides)
    before = snapshot(method.nets.read["value"])
    calls = []
    logs = method.training_step(data_batch(), 0, make_update(method, calls)).scalars
    assert ("value" in [optimizer for _, optimizer, _, _ in calls]) == trained
    assert ("loss_value" in logs) == trained
    assert bool(changed(before, method.nets.read["value"])) == trained


def test_velocity_with_zero_momentum_is_the_last_squared_step(make_dxmi):
    """m = 0 edge case: the buffer forgets its initial ones and equals this step's mean squared step."""
    method = make_dxmi("method.velocity_momentum=0.0")
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with torch.no_grad():
        traj = method.nets.read["sampler"].sample(B, return_trajectory=True, noise=lambda s: torch.randn(s))
    torch.set_rng_state(state)
    method.training_step(data_batch(), 0, make_update(method, []))
    torch.testing.assert_close(method.velocity, (traj[1:] - traj[:-1]).pow(2).flatten(2).mean(2).mean(1))


def test_extra_state_round_trip(make_dxmi):
    """extra_state is JSON-serialisable and load_extra_state restores the velocity buffer bit for bit."""
    method = make_dxmi()
    torch.manual_seed(3)
    method.training_step(data_batch(), 0, make_update(method, []))
    assert not torch.equal(method.velocity, torch.ones(2))
    state = json.loads(json.dumps(method.extra_state()))
    other = make_dxmi()
    other.load_extra_state(state)
    assert other.velocity.dtype == method.velocity.dtype
    assert torch.equal(other.velocity, method.velocity)


# ---------------------------------------------------------------------------------------------- critic objective

@pytest.mark.parametrize("name, cls", [("cd", CD), ("nce", NCE), ("n2ce", N2CE), ("nwj", NWJ), ("gan", NCE)])
def test_critic_objective_follows_recipe(make_dxmi, name, cls):
    """critic.objective picks the class; ratio_reg always reaches it, M only for N²CE."""
    method = make_dxmi(f"critic.objective={name}", "critic.M=7.5", "critic.ratio_reg=0.25")
    assert type(method.objective) is cls
    assert method.objective.ratio_reg == 0.25
    if name == "n2ce":
        assert method.objective.M == 7.5
    else:
        assert method.objective.M is None


class _Hinge(CriticObjective):
    """A new objective written where a user would: one class (here, in the test) and one registry entry. Its
    hyperparameter's annotation and default are its recipe schema (``critic.margin``)."""

    def __init__(self, margin: Annotated[float, Ge(0)] = 1.0, ratio_reg: float = 0.0):
        super().__init__(ratio_reg)
        self.margin = margin

    def loss(self, ld, ln, weight_data=None, weight_noise=None):
        return torch.relu(self.margin - ld).mean() + torch.relu(self.margin + ln).mean()


def test_a_registered_objective_is_usable_from_a_recipe(make_dxmi, monkeypatch):
    """Registering an objective is all it takes: the recipe validates it and its hyperparameter, the method
    trains with it, and the resolved recipe stores the hyperparameter."""
    with pytest.raises(ConfigError, match="critic.objective: unknown objective 'hinge'; choose from cd, gan"):
        make_dxmi("critic.objective=hinge")
    with pytest.raises(ConfigError, match="^critic.margin: unknown key$"):
        make_dxmi("critic.margin=2")
    monkeypatch.setitem(OBJECTIVES, "hinge", _Hinge)
    method = make_dxmi("critic.objective=hinge", "critic.ratio_reg=0.5", "critic.margin=2")
    assert type(method.objective) is _Hinge and method.objective.ratio_reg == 0.5 and method.objective.margin == 2.0
    assert make_dxmi("critic.objective=hinge").objective.margin == 1.0  # the objective's default
    assert method.recipe.resolved()["critic"]["margin"] == 2.0 and "M" not in method.recipe.resolved()["critic"]
    with pytest.raises(ConfigError, match=r"^critic.margin: Input should be greater than or equal to 0 \(got -1\)$"):
        make_dxmi("critic.objective=hinge", "critic.margin=-1")
    assert make_dxmi("critic.margin=3").recipe.unused_keys() == ["critic.margin: not used by objective 'n2ce'; ignored"]
    calls = []
    method.training_step(data_batch(), 0, make_update(method, calls))
    assert "critic" in [call[0] for call in calls] and all(torch.isfinite(call[3]) for call in calls)


def test_sampler_warmup_trains_the_critic_alone(make_dxmi):
    """Before ``sampler_warmup_images`` (B = 8 per step: steps 0 and 1 of 16 images) only the critic learns."""
    method = make_dxmi("method.sampler_warmup_images=16")
    before = {name: snapshot(net) for name, net in method.nets.read.items()}
    for step in (0, 1):
        calls = []
        output = method.training_step(data_batch(), step, make_update(method, calls))
        assert [optimizer for _, optimizer, _, _ in calls] == ["critic"]
        assert set(output.scalars) == {"loss_critic"} and output.critic_logits is not None
    assert changed(before["critic"], method.nets.read["critic"])
    assert not changed(before["sampler"], method.nets.read["sampler"]) and not changed(before["value"], method.nets.read["value"])
    calls = []
    method.training_step(data_batch(), 2, make_update(method, calls))
    assert [optimizer for _, optimizer, _, _ in calls] == ["critic", "value", "sampler"]


def test_a_spacing_the_teacher_cannot_give_names_the_key(recipe_file, edm_unet_teacher):
    """Uniform spacing picks discrete VP timesteps: on an EDM teacher it is a one-line error naming method.spacing."""
    from n2ce_distill.errors import InputError

    path = recipe_file({"method": {"name": "dxmi", "num_steps": 2, "spacing": "uniform"}, "data": {"name": "digits"},
                        "teacher": {"path": str(edm_unet_teacher)}})
    with pytest.raises(InputError, match=r"^method\.spacing: uniform spacing needs a discrete-time \(VP\) denoiser"):
        DxMI(load_recipe(path, TINY), SHAPE)
