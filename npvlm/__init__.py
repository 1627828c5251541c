"""npvlm: PaliGemma as explicit NumPy/CuPy array math, equal to Hugging Face transformers."""

from .api import PaliGemma, load
from .config import PaliGemmaConfig, TextConfig, VisionConfig, load_config
from .errors import BackendError, CheckpointError, ConfigError, InputError, NpvlmError

__version__ = "0.1.0"

__all__ = [
    "load", "PaliGemma", "load_config", "PaliGemmaConfig", "TextConfig", "VisionConfig",
    "NpvlmError", "ConfigError", "CheckpointError", "InputError", "BackendError",
]
