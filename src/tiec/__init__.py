"""tiec: training-free acceleration of diffusion sampling by encoder propagation and TIEC.

Example (``pipe``: any Stable Diffusion shaped diffusers pipeline; here the demo model, ``tiec.demo.load_pipeline()``):
    >>> import tiec
    >>> with tiec.apply(pipe, tiec.EncoderPropagationConfig(estimator="extrapolate")) as handle:
    ...     image = pipe("a photo of a bag").images[0]
    >>> handle.stats["encoder_runs"], handle.stats["decoder_runs"]  # the encoder ran at the 9 key steps of 50
    (9, 50)
"""

from . import schedules
from .api import Handle, apply
from .deepcache import DeepCacheConfig
from .families import BlockModel
from .propagation import EncoderPropagationConfig
from .tome import TokenMergingConfig

__version__ = "0.1.0"
__all__ = ["BlockModel", "DeepCacheConfig", "EncoderPropagationConfig", "Handle", "TokenMergingConfig", "apply", "schedules",
           "__version__"]
