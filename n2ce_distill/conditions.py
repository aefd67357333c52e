"""What a loop's conditioning is: none, class labels, or prompts.

A data batch's labels are class indices (B,) for labelled data and caption indices (B,) into the data set's
prompt list for captioned data; :meth:`Conditions.encode` turns them into what the nets read (class indices as
they are, prompts into their text-encoder embeddings (B, L, D), once per batch), and :meth:`Conditions.sample`
draws the conditions of generated samples: every class, or every prompt, equally often.
"""

from __future__ import annotations

import torch

from .data import balanced_labels
from .latent import PromptEncoder

__all__ = ["ClassConditions", "Conditions", "PromptConditions", "repeat_rows"]


def repeat_rows(condition: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A batch's condition for the batch repeated ``n`` times (rows ``0..B-1, 0..B-1, ...``), any condition shape."""
    return None if condition is None else condition.repeat(n, *([1] * (condition.dim() - 1)))


class Conditions:
    """No conditioning: an unconditional loop."""

    def encode(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The nets' condition for a batch's data labels."""
        if labels is not None:
            raise ValueError("an unconditional loop got labels")
        return None

    def sample(self, n: int, device: torch.device | str) -> torch.Tensor | None:
        """The conditions of ``n`` generated samples."""
        del n, device
        return None


class ClassConditions(Conditions):
    """Class labels, read by the nets as they are."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def encode(self, labels):
        return labels

    def sample(self, n, device):
        return balanced_labels(n, self.num_classes, device)


class PromptConditions(Conditions):
    """Prompts (a data set's captions, indexed by its labels), read as the frozen text encoder's embeddings."""

    def __init__(self, prompts: list[str], encoder: PromptEncoder):
        if not prompts:
            raise ValueError("PromptConditions needs at least one prompt")
        self.prompts, self.encoder = list(prompts), encoder

    def encode(self, labels):
        embeddings = self.encoder([self.prompts[i] for i in labels.tolist()])
        return embeddings.to(labels.device)

    def sample(self, n, device):
        return self.encode(balanced_labels(n, len(self.prompts), device))
