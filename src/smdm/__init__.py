"""smdm: masked diffusion language models and their autoregressive baselines."""

from smdm.config import ModelConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "__version__"]
