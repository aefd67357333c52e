"""Training loops as small method objects driven by the generic trainer."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import DMD2Config, DxMIConfig, RecipeConfig, SiDConfig, TeacherTrainingConfig
from ..data import num_classes, prompts, sample_shape
from .base import Method, Nets, Processes, StepOutput, StudentMethod, Update

__all__ = ["Method", "Nets", "Processes", "StepOutput", "StudentMethod", "Update", "build_method"]


def build_method(recipe: RecipeConfig, dataset: Dataset) -> Method:
    """The method whose config section the recipe holds (``recipe.method``), sized to the data set's samples and
    conditioned on its classes when it has labels, on its captions when it has them."""
    from .dmd2 import DMD2
    from .dxmi import DxMI
    from .sid import SiD
    from .teacher import TeacherTraining

    methods = {TeacherTrainingConfig: TeacherTraining, DxMIConfig: DxMI, SiDConfig: SiD, DMD2Config: DMD2}
    return methods[type(recipe.method)](recipe, sample_shape(dataset), num_classes(dataset), prompts(dataset))
