r"""Overhead: one critic training step with NCE, N²CE(M=100) and a naive "M noise copies" N²CE.

N²CE magnifies the noise by a weight M in the loss, on the same batch of B noise samples as NCE, so its
step costs the same as NCE's (the loss is negligible next to the critic). The naive reading of
"M copies of the noise" draws M*B noise samples per step and scores all of them, i.e.
``n2ce_loss(ld, ln_big, M)`` on ``B`` data and ``M*B`` noise logits (the same objective in expectation),
which costs ~(M+1)/2 times more. It is timed with a small M (8 in full mode): M = 100 would push
51,712 images per step through the critic. Noise tensors are pre-drawn, so only the critic step
(forward on data + noise, loss, backward, Adam step) is timed; in distillation the naive variant would
also pay M generator calls per step.

Each variant has its own identical critic and optimiser. Repetitions are interleaved (one step of every
variant per round, after warm-up rounds), and the median step time is reported with its ratio to NCE.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from ..critics import ConvCritic
from ..objectives import N2CE, NCE
from ..reporting import markdown_table, new_figure, save_figure
from .report import single_thread

__all__ = ["time_steps", "run"]

N2CE_M = 100.0


def _variants(naive_M: int) -> list[tuple[str, object, int]]:
    """``(label, objective, noise copies per data sample)``."""
    return [("NCE", NCE(), 1), (f"N2CE (M={N2CE_M:g})", N2CE(M=N2CE_M), 1),
            (f"naive copies (M={naive_M})", N2CE(M=naive_M), naive_M)]


def time_steps(critic_kwargs: dict, image_shape: tuple[int, int, int], batch_size: int, naive_M: int,
               reps: int, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per training step for each variant, measured in interleaved rounds: each round runs every variant
    once, in a fresh random order (a fixed order lets whatever drifts within a round, cache or clock, favour one
    variant); entry ``i`` of every list is round ``i``, so ratios can be paired by round."""
    torch.manual_seed(seed)
    template = ConvCritic(**critic_kwargs)
    setups = []
    for label, objective, copies in _variants(naive_M):
        critic = ConvCritic(**critic_kwargs)
        critic.load_state_dict(template.state_dict())
        opt = torch.optim.Adam(critic.parameters(), lr=1e-4)
        x_data = torch.randn(batch_size, *image_shape)
        x_noise = torch.randn(batch_size * copies, *image_shape)
        setups.append((label, critic, opt, objective, x_data, x_noise))
    times: dict[str, list[float]] = {label: [] for label, *_ in setups}
    order = random.Random(seed)
    for round_ in range(warmup + reps):
        for label, critic, opt, objective, x_data, x_noise in order.sample(setups, len(setups)):
            start = time.perf_counter()
            logits = critic(torch.cat([x_data, x_noise]))
            loss = objective(logits[:batch_size], logits[batch_size:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[label].append(elapsed)
    return times


@single_thread()
def run(quick: bool, out: Path) -> str:
    if quick:
        critic_kwargs = dict(in_channels=1, channels=(8, 16), num_res_blocks=2)
        batch_size, naive_M, reps, warmup = 128, 4, 5, 1
    else:
        critic_kwargs = dict(in_channels=1, channels=(32, 64), num_res_blocks=2)
        batch_size, naive_M, reps, warmup = 512, 8, 30, 3
    image_shape = (1, 8, 8)
    times = time_steps(critic_kwargs, image_shape, batch_size, naive_M, reps, warmup)
    rows = []
    for (label, _, copies), samples in zip(_variants(naive_M), times.values()):
        med = float(np.median(samples))
        q1, q3 = np.percentile(samples, [25, 75])
        paired = np.array(samples) / np.array(times["NCE"])  # the same round's NCE step: drift cancels
        r1, r3 = np.percentile(paired, [25, 75])
        rows.append([label, batch_size * copies, med * 1e3, f"{q1 * 1e3:.1f} .. {q3 * 1e3:.1f}",
                     f"{np.median(paired):.3f} ({r1:.3f} .. {r3:.3f})"])
    headers = ["variant", "noise samples / step", "median step (ms)", "IQR (ms)", "ratio to NCE, paired by round (IQR)"]

    fig, (ax,) = new_figure(1, width=6.0, height=4.0)
    ax.boxplot([np.array(v) * 1e3 for v in times.values()], tick_labels=list(times))
    ax.set(ylabel="step time (ms)",
           title=f"ConvCritic{tuple(critic_kwargs['channels'])} on 1x8x8, batch {batch_size}, {reps} rounds")
    save_figure(fig, out, "overhead.png")
    setup = (f"ConvCritic(in_channels=1, channels={tuple(critic_kwargs['channels'])}, "
             f"num_res_blocks={critic_kwargs['num_res_blocks']}) on 1x8x8 images, batch {batch_size}, "
             f"{reps} interleaved rounds after {warmup} warm-up, torch threads {torch.get_num_threads()}.")
    return markdown_table(headers, rows) + "\n\n" + setup
