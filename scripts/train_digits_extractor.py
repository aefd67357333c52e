"""Train the digits feature extractor shipped in assets/digits-extractor/ (CPU, a few seconds).

Fixed stratified 80/20 train/test split of scikit-learn's load_digits (seeded), Adam, +-1 pixel
random shifts as augmentation. Writes model.safetensors, config.json and the model card README.md.

    .venv/bin/python scripts/train_digits_extractor.py [--out assets/digits-extractor] [--seed 0]
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from n2ce_distill.feature_extractors import DIGITS_EXTRACTOR_DIR, DigitsNet, digits_uint8, uint8_to_digits_input

CARD = """# digits feature extractor

Small CNN classifier on scikit-learn's `load_digits` (1797 grey 8x8 images, 10 classes), used as the
offline feature extractor `digits` for FID/KID/precision-recall through torch-fidelity
(`n2ce_distill.feature_extractors.FeatureExtractorDigits`, registered by `register_digits_extractor()`).

| item | value |
| --- | --- |
| architecture | conv{width}-conv{width2}-pool-conv{width2}-pool-fc{feature_dim}-fc10 (ReLU), {num_params} parameters |
| input | uint8 (N, 1 or 3, H, W); grey, resized to 8x8, mapped to [-1, 1] |
| features for FID ("digits-features") | {feature_dim}-d, post-ReLU penultimate layer |
| split | stratified 80/20, seed {seed}: {n_train} train / {n_test} test |
| training | Adam lr {lr}, weight decay {weight_decay}, {epochs} epochs, batch {batch_size}, +-1 px shifts |
| **test accuracy** | **{test_accuracy:.4f}** ({n_test} held-out images) |
| train accuracy | {train_accuracy:.4f} |
| training time | {seconds:.1f} s on CPU |

Reproduce: `.venv/bin/python scripts/train_digits_extractor.py --seed {seed}`.
FID values computed with this network are comparable only with each other, not with Inception FIDs.
"""


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (padding with background, -1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 9, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for k in range(9):
        i, j, chosen = k // 3, k % 3, offsets == k
        out[chosen] = padded[chosen, :, i : i + 8, j : j + 8]
    return out


def accuracy(net: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return (net(x)[1].argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DIGITS_EXTRACTOR_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=64)
    args = parser.parse_args()
    hp = {"lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": args.epochs}

    torch.set_num_threads(1)  # the net is tiny: extra threads only add contention (and nondeterminism)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    # same uint8 -> [-1, 1] path as evaluation, so the network sees exactly what FID feeds it
    images = uint8_to_digits_input(digits_uint8())
    labels = torch.from_numpy(load_digits().target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=args.seed, stratify=labels.numpy()
    )
    x_train, y_train = images[idx_train], labels[idx_train]
    x_test, y_test = images[idx_test], labels[idx_test]

    net = DigitsNet(width=args.width, feature_dim=args.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["epochs"])
    start = time.perf_counter()
    for epoch in range(hp["epochs"]):
        net.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(hp["batch_size"]):
            loss = F.cross_entropy(net(random_shift(x_train[batch], generator))[1], y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - start

    net.eval()
    info = {
        **net.config,
        "image_size": 8,
        "seed": args.seed,
        "n_train": len(idx_train),
        "n_test": len(idx_test),
        "train_accuracy": accuracy(net, x_train, y_train),
        "test_accuracy": accuracy(net, x_test, y_test),
        "num_params": sum(p.numel() for p in net.parameters()),
        "seconds": seconds,
        **hp,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "README.md").write_text(CARD.format(width2=2 * info["width"], **info))
    print(f"test accuracy {info['test_accuracy']:.4f} ({info['n_test']} images), "
          f"feature dim {info['feature_dim']}, {seconds:.1f} s -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
