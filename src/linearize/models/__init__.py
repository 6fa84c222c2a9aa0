"""Our decoder (LLaMA and GPT-2 families), checkpoint loading, conversion, save and load."""

from linearize.models.config import ModelConfig
from linearize.models.convert import is_new_parameter, linearize, reconfigure
from linearize.models.decoder import Decoder, ModelState
from linearize.models.directory import save
from linearize.models.io import load

__all__ = [
    "Decoder",
    "ModelConfig",
    "ModelState",
    "is_new_parameter",
    "linearize",
    "load",
    "reconfigure",
    "save",
]
