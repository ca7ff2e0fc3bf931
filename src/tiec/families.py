"""The denoisers encoder propagation supports, what their encoder is, and how a pipeline calls them.

| family | models | encoder |
|---|---|---|
| ``unet`` | ``UNet2DConditionModel`` (SD, SDXL, IF stages I and II), ``UNetMotionModel`` (AnimateDiff), ``UNetSpatioTemporalConditionModel`` (SVD) | ``conv_in``, down blocks, mid block (temporal layers inside them included) |
| ``unet`` | ``UNet3DConditionModel`` (text-to-video) | the same, plus the temporal ``transformer_in`` after ``conv_in`` |
| ``dit``, ``pixart``, ``sd3``, ``flux`` | ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` | the first ``k`` transformer blocks (Flux: its two-stream blocks, then its single-stream ones) |
| ``blocks`` | any model named with :class:`BlockModel` | the first ``k`` blocks of the named stack |

``k`` is ``EncoderPropagationConfig(encoder_blocks=k)``, by default ``round(18 / 28 * len(blocks))``:
FasterDiffusion's DiT-XL/2 setting (its encoder is the first 18 of 28 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .split import BlockSplit, EncoderSplit

ENCODER_SHARE = 18 / 28

UNET_CLASSES = ("UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel", "UNetSpatioTemporalConditionModel")
TRANSFORMER_CLASSES = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart",
                       "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


@dataclass(frozen=True, eq=False)
class BlockModel:
    """A model outside diffusers whose ``forward`` runs a stack of blocks: name the stack, and tiec can split it.

    The encoder is the first ``k`` blocks (``EncoderPropagationConfig(encoder_blocks=k)``; default
    ``round(18 / 28 * len(blocks))``). At a key step the output of block ``k - 1`` is recorded; elsewhere the
    first ``k`` blocks return the estimated features without computing, so the model's code between blocks
    must pass a block's output to the next block unchanged, and every block must return the same structure
    (a tensor, or a tuple of tensors whose first dimension is the batch).

    Args:
        model: the denoiser (an ``nn.Module``); tiec patches its ``forward`` and the blocks' ``forward``.
        blocks: the block stack, in the order ``forward`` runs it (an ``nn.ModuleList`` or a list of modules).
        sample_arg: the name of ``forward``'s noisy-input argument.
        timestep_arg: the name of ``forward``'s timestep argument.

    Example (an MLP-Mixer-like score model and a hand-written DDIM loop; a bare model needs ``start_run``):
        >>> class Mixer(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.out = torch.nn.Linear(2, 16), torch.nn.Linear(16, 2)
        ...         self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6))
        ...     def forward(self, x, t):
        ...         h = self.embed(x) + torch.sin(t.float() / 100)[:, None]
        ...         for layer in self.layers:
        ...             h = h + torch.tanh(layer(h))
        ...         return self.out(h)
        >>> from diffusers import DDIMScheduler
        >>> model, scheduler = Mixer(), DDIMScheduler()
        >>> scheduler.set_timesteps(10)
        >>> handle = tiec.apply(tiec.BlockModel(model, model.layers, sample_arg="x", timestep_arg="t"),
        ...                     tiec.EncoderPropagationConfig(key_steps="every:2", encoder_blocks=4))
        >>> handle.start_run(10)
        >>> x = torch.randn(8, 2)
        >>> with torch.no_grad():
        ...     for t in scheduler.timesteps:
        ...         x = scheduler.step(model(x, t.expand(8)), t, x).prev_sample
        >>> handle.stats["encoder_runs"], handle.stats["decoder_runs"]
        (5, 10)
        >>> handle.remove()
    """

    model: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    sample_arg: str = "sample"
    timestep_arg: str = "timestep"

    def __post_init__(self):
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"BlockModel: model must be a torch.nn.Module, got {type(self.model).__name__}")
        blocks = list(self.blocks)
        if len(blocks) < 2 or not all(isinstance(b, torch.nn.Module) for b in blocks):
            raise ValueError("BlockModel: blocks must be a sequence of at least two torch.nn.Module blocks")
        owned = {id(m) for m in self.model.modules()}
        if any(id(b) not in owned for b in blocks):
            raise ValueError("BlockModel: every block must be a submodule of model")
        object.__setattr__(self, "blocks", tuple(blocks))


@dataclass(frozen=True)
class Family:
    """How one denoiser is split and called (see the module's table)."""

    name: str
    sample_arg: str = "sample"
    timestep_arg: str = "timestep"
    timestep_scale: float = 1.0          # scheduler timestep = the model's timestep argument x this (Flux: 1000)
    channel_dim: int = 1                 # the latent channels' dimension of the sample (SVD: 2; Flux, packed: -1)
    frame_dim: int | None = None         # video: the frames' dimension of the sample (folded into the batch inside)
    blocks: tuple[torch.nn.Module, ...] | None = None  # None: a UNet
    untiled: frozenset[str] = field(default_factory=frozenset)  # arguments without a batch dimension
    cond_first: bool = False             # the guidance batch is [cond, uncond] (DiTPipeline)
    guidance_arg: str = "guidance_scale"  # the call argument of classifier-free guidance (Flux: true_cfg_scale)
    serial: bool = False                 # the model reads frames from its batch size: no batched decoders

    @property
    def is_unet(self) -> bool:
        return self.blocks is None

    def frames(self, sample: torch.Tensor) -> int:
        """How many rows of the model's internal batch one sample becomes (its frames; 1 for images)."""
        return 1 if self.frame_dim is None else sample.shape[self.frame_dim]

    def default_blocks(self) -> int | None:
        """The default ``k`` of a block stack (None for a UNet)."""
        if self.blocks is None:
            return None
        return min(max(1, round(ENCODER_SHARE * len(self.blocks))), len(self.blocks) - 1)

    def make_split(self, part: Any, model: torch.nn.Module, encoder_blocks: int | None) -> EncoderSplit | BlockSplit:
        if self.blocks is None:
            if encoder_blocks is not None:
                raise ValueError(f"encoder_blocks={encoder_blocks} applies to transformers and BlockModel only; a "
                                 f"UNet's encoder is its conv_in, down blocks and mid block")
            return EncoderSplit(part, model)
        k = self.default_blocks() if encoder_blocks is None else encoder_blocks
        return BlockSplit(part, self.blocks, k)


def is_denoiser(model: Any) -> bool:
    """Whether ``model`` is one of the diffusers denoisers tiec knows (by class name, diffusers' own classes)."""
    return isinstance(model, torch.nn.Module) and known_class(model) is not None


def known_class(model: torch.nn.Module) -> str | None:
    """The diffusers denoiser class ``model`` is (or subclasses), by name; None for any other model."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("diffusers.") and (cls.__name__ in UNET_CLASSES
                                                         or cls.__name__ in TRANSFORMER_CLASSES):
            return cls.__name__
    return None


def family_of(model: torch.nn.Module, pipe: Any = None, custom: BlockModel | None = None) -> Family:
    """The family of ``model`` (called by ``pipe``, if any); ``custom`` names a model outside diffusers."""
    if custom is not None:
        return Family("blocks", sample_arg=custom.sample_arg, timestep_arg=custom.timestep_arg, blocks=custom.blocks)
    name = known_class(model)
    if name is None:
        raise TypeError(f"tiec does not know {type(model).__name__}; name its block stack with tiec.BlockModel")
    if name == "UNetSpatioTemporalConditionModel":  # (batch, frames, channels, height, width)
        return Family("unet", channel_dim=2, frame_dim=1)
    if name in ("UNet3DConditionModel", "UNetMotionModel"):  # (batch, channels, frames, height, width)
        return Family("unet", frame_dim=2)
    if name in UNET_CLASSES:
        # Text2Video-Zero's cross-frame attention counts the frames from the batch size: a batch of several steps
        # would attend to the wrong first frame, so its decoders run one step at a time.
        return Family("unet", serial=pipe is not None and type(pipe).__name__.startswith("TextToVideoZero"))
    kind = TRANSFORMER_CLASSES[name]
    blocks = tuple(model.transformer_blocks)
    if kind == "flux":
        blocks += tuple(model.single_transformer_blocks)
        # guidance_scale is Flux's embedded (distilled) guidance; true CFG calls the model twice per step
        return Family(kind, sample_arg="hidden_states", timestep_scale=1000.0, channel_dim=-1, blocks=blocks,
                      untiled=frozenset({"img_ids", "txt_ids"}), guidance_arg="true_cfg_scale")
    return Family(kind, sample_arg="hidden_states", blocks=blocks,
                  cond_first=pipe is not None and type(pipe).__name__.startswith("DiTPipeline"))
