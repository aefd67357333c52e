"""How well can a recipe's critic tell a fixed student from data? Train it offline, score held-out halves.

In a distillation loop the critic takes one step per iteration against a moving student, so this is
an upper bound on the signal it gives the student. Near-chance accuracy on a good student means the
student is following noise (RESULTS.md, DxMI drift).

    .venv/bin/python scripts/critic_probe.py runs/dxmi/best --recipe recipes/digits_dxmi_n2ce.yaml --steps 800
    .venv/bin/python scripts/critic_probe.py assets/digits-teacher@4 --recipe recipes/digits_dxmi_n2ce.yaml critic.ratio_reg=0.01
"""

from __future__ import annotations

import argparse
import sys

import torch

from n2ce_distill.config import load_recipe
from n2ce_distill.critics import build_critic
from n2ce_distill.data import dataset_from_config
from n2ce_distill.diagnostics import critic_diagnostics
from n2ce_distill.methods.base import critic_objective
from n2ce_distill.pipelines import load_sample_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="exported pipeline folder, or TEACHER@STEPS (ancestral, the teacher's few-step schedule)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. optim.critic.lr=1e-4")
    parser.add_argument("--recipe", required=True, help="a DxMI recipe: its critic, optim.critic and data sections are used")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--num-samples", type=int, default=3000)
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of data and of samples scored, never trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if "critic" not in recipe.optim:
            raise ValueError(f"--recipe {args.recipe}: method {recipe.method.name!r} trains no separate critic network")
        path, _, steps = args.source.partition("@")
        source = load_sample_source(path, steps=int(steps), spacing="auto") if steps else load_sample_source(path)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    dataset = dataset_from_config(recipe.data, args.seed)
    data = dataset.batch(torch.randperm(len(dataset)))
    samples = source(args.num_samples, torch.Generator().manual_seed(args.seed))
    split = lambda x: x.split([len(x) - int(args.held_out * len(x)), int(args.held_out * len(x))])  # noqa: E731
    (data_train, data_test), (samples_train, samples_test) = split(data), split(samples)

    critic = build_critic(recipe.critic, tuple(data.shape[1:]))
    objective = critic_objective(recipe.critic)
    settings = recipe.optim["critic"]
    optimizer = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=settings.betas)
    batch = recipe.train.batch_size
    pick = lambda x: x[torch.randint(len(x), (batch,))]  # noqa: E731
    print(f"| step | train loss | acc data | acc samples | logit data | logit samples |\n|{' --- |' * 6}")
    for step in range(1, args.steps + 1):
        logits_data, logits_samples = critic(torch.cat([pick(data_train), pick(samples_train)])).split(batch)
        loss = objective(logits_data, logits_samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            with torch.no_grad():
                d = critic_diagnostics(critic(data_test), critic(samples_test))
            print(f"| {step} | {loss.item():.3f} | {d['acc_data']:.3f} | {d['acc_noise']:.3f} | "
                  f"{d['logit_data']:.3f} | {d['logit_noise']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
