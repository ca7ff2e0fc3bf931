"""The embedded demo model: a class-conditional pixel-space UNet on Fashion-MNIST, its pipeline and a classifier.

The UNet has Stable Diffusion's shape (skip connections, a cross-attention mid block, cross-attention
conditioning on a short sequence of "text" tokens), scaled down to 32x32 grayscale, so that encoder
propagation exercises exactly the code paths it uses on Stable Diffusion.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

CLASSES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat",
                            "sandal", "shirt", "sneaker", "bag", "ankle boot")
_ALIASES = {"t-shirt": ("t-shirt", "tshirt", "t shirt", "top"), "trouser": ("trouser", "pants"),
            "ankle boot": ("ankle boot", "boot")}
NULL_CLASS = len(CLASSES)  # index of the unconditional embedding used for classifier-free guidance
IMAGE_SIZE, PADDED_SIZE = 28, 32
DEFAULT_GUIDANCE = 1.5
WEIGHTS_DIR = Path(__file__).parent / "weights"

UNET_CONFIG = dict(
    sample_size=PADDED_SIZE, in_channels=1, out_channels=1, layers_per_block=2,
    block_out_channels=(32, 64, 96, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)
"""The UNet of new demo models: Stable Diffusion's layout (two layers per down block, three per up block), so that
the encoder is 30.5% of the UNet FLOPs (SD1.5: about 32%). The first release used one layer per block (24%)."""
# clip_sample stays off, as in Stable Diffusion's DDIM config: DDIM clips its x0 estimate but keeps the model's
# epsilon, so with guidance the two disagree and the images drift bright and lose their class (measured on the
# demo model, 40 images, DDIM-20, guidance 3: classifier adherence 42% with clipping, 95% without).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                        prediction_type="v_prediction")
"""v-prediction: with epsilon prediction the loss gives the high-noise steps almost no weight in terms of the image
they imply (see the model card), and the first release's samples came out speckled."""
LEGACY_CONFIG = {"unet": dict(UNET_CONFIG, layers_per_block=1),
                 "scheduler": dict(SCHEDULER_CONFIG, prediction_type="epsilon")}
"""The first release's model (3,400 steps, epsilon prediction): what a weights folder without config.json holds."""
CONFIG_FILE = "config.json"


def _class_patterns() -> list[tuple[int, re.Pattern]]:
    patterns = []
    for index, name in enumerate(CLASSES):
        for alias in _ALIASES.get(name, (name,)):
            patterns.append((index, re.compile(r"(?<![\w-])" + re.escape(alias) + r"s?(?![\w-])")))
    return patterns


_PATTERNS = _class_patterns()


def parse_prompt(prompt: str) -> int:
    """The class index a prompt names ("sneaker", "a photo of an ankle boot"); ValueError otherwise.

    Example:
        >>> parse_prompt("a photo of an ankle boot")
        9
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt={prompt!r} must be a string naming one of the classes {list(CLASSES)}")
    text = prompt.lower().replace("_", " ")
    found = {index for index, pattern in _PATTERNS if pattern.search(text)}
    if len(found) != 1:
        what = "names no known class" if not found else f"names several classes {[CLASSES[i] for i in sorted(found)]}"
        raise ValueError(f"prompt={prompt!r} {what}; the demo model knows exactly these classes: {list(CLASSES)}")
    return found.pop()


class ClassEmbedder(ModelMixin, ConfigMixin):
    """A learned sequence of `num_tokens` "text" tokens per class, plus one for the empty prompt."""

    @register_to_config
    def __init__(self, num_classes: int = len(CLASSES), num_tokens: int = 4, dim: int = 64):
        super().__init__()
        self.embedding = torch.nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding[labels]


def pad_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) float in [-1, 1], padded with the background value."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    pad = (PADDED_SIZE - IMAGE_SIZE) // 2
    return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)


class FashionPipeline(DiffusionPipeline):
    """Class-conditional Fashion-MNIST sampler with classifier-free guidance; any diffusers scheduler fits.

    Example:
        >>> pipe = tiec.demo.load_pipeline()
        >>> image = pipe("sneaker", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.size, image.mode
        ((28, 28), 'L')
    """

    model_cpu_offload_seq = "embedder->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DConditionModel, scheduler, embedder: ClassEmbedder):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, embedder=embedder)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def encode_prompt(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list; give at least one class name")
        labels = torch.tensor([parse_prompt(p) for p in prompts], device=self.device)
        labels = labels.repeat_interleave(num_images_per_prompt)
        cond = self.embedder(labels).to(self.unet.dtype)
        uncond = self.embedder(torch.full_like(labels, NULL_CLASS)).to(self.unet.dtype)
        return cond, uncond

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_inference_steps: int = 50,
                 guidance_scale: float = DEFAULT_GUIDANCE, generator: torch.Generator | list | None = None,
                 output_type: str = "pil", num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True):
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}; use 'pil', 'np' or 'pt'")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        self._guidance_scale = guidance_scale
        cond, uncond = self.encode_prompt(prompt, num_images_per_prompt)
        embeds = torch.cat([uncond, cond]) if self.do_classifier_free_guidance else cond
        shape = (cond.shape[0], 1, PADDED_SIZE, PADDED_SIZE)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents.to(self.device, self.unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                uncond_pred, cond_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                local = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
        pad = (PADDED_SIZE - IMAGE_SIZE) // 2
        images = (latents[:, :, pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE].float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = [Image.fromarray((im[..., 0] * 255).round().astype(np.uint8), mode="L") for im in result]
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def build_pipeline(seed: int = 0, config: dict | None = None) -> FashionPipeline:
    """The demo pipeline with freshly initialised (random) weights: for training and tests.

    `config` is `{"unet": ..., "scheduler": ...}` (a weights folder's config.json); default: the current
    UNET_CONFIG and SCHEDULER_CONFIG.
    """
    config = config or {"unet": UNET_CONFIG, "scheduler": SCHEDULER_CONFIG}
    torch.manual_seed(seed)
    unet_config = dict(config["unet"])
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        unet_config[key] = tuple(unet_config[key])  # JSON gives lists
    return FashionPipeline(unet=UNet2DConditionModel(**unet_config), scheduler=DDIMScheduler(**config["scheduler"]),
                           embedder=ClassEmbedder(dim=unet_config["cross_attention_dim"]))


def read_config(weights_dir: str | Path) -> dict:
    """The model configuration of a weights folder: its config.json, or the first release's for older folders."""
    import json

    path = Path(weights_dir) / CONFIG_FILE
    if not path.exists():
        return LEGACY_CONFIG
    try:
        config = json.loads(path.read_text())
        return {"unet": config["unet"], "scheduler": config["scheduler"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a demo model configuration ({e}); retrain or reinstall tiec") from None


def load_pipeline(device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  weights_dir: str | Path | None = None) -> FashionPipeline:
    """The trained demo pipeline, from the weights inside the installed package (no network).

    Example:
        >>> pipe = load_pipeline()
        >>> pipe("a photo of a bag", num_inference_steps=20).images[0].save("bag.png")
        >>> Image.open("bag.png").size
        (28, 28)
    """
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = weights_dir / "unet.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"demo weights {path.resolve()} are missing; train them with `tiec train-demo` "
                                f"or reinstall tiec")
    pipe = build_pipeline(config=read_config(weights_dir))
    state = load_file(str(path))
    embedder_state = {k.removeprefix("embedder."): v for k, v in state.items() if k.startswith("embedder.")}
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    pipe.unet.load_state_dict({k: v.float() for k, v in unet_state.items()})
    pipe.embedder.load_state_dict({k: v.float() for k, v in embedder_state.items()})
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device or "cpu")
    if dtype is not None:
        pipe.unet.to(dtype=dtype)
        pipe.embedder.to(dtype=dtype)
    return pipe


class Classifier(torch.nn.Module):
    """A small CNN for 28x28 Fashion-MNIST images in [0, 1]."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(
            *block(1, 32), *block(32, 32), torch.nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), torch.nn.MaxPool2d(2),
            *block(64, 128), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, len(CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.5)


_classifier: Classifier | None = None


def load_classifier(weights_dir: str | Path | None = None) -> Classifier:
    """The trained classifier from the package weights (cached after the first load)."""
    global _classifier
    from safetensors.torch import load_file

    if _classifier is not None and weights_dir is None:
        return _classifier
    path = Path(weights_dir or WEIGHTS_DIR) / "classifier.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"classifier weights {path} are missing; train them with "
                                f"`tiec train-demo --classifier`")
    model = Classifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.eval()
    if weights_dir is None:
        _classifier = model
    return model


def images_to_tensor(images) -> torch.Tensor:
    """PIL list, (N, H, W[, 1]) arrays in [0, 1] or uint8, or (N, 1, H, W) tensors -> (N, 1, 28, 28) float in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is empty")
        if isinstance(images[0], Image.Image):
            images = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])
        else:
            images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        if array.ndim == 4:
            if array.shape[-1] not in (1, 3):
                raise ValueError(f"images of shape {images.shape}: expected (N, H, W, 1|3)")
            array = array.mean(-1)
        if array.ndim != 3:
            raise ValueError(f"images of shape {images.shape}: expected (N, H, W) or (N, H, W, C)")
        tensor = torch.from_numpy(array).unsqueeze(1)
    elif isinstance(images, torch.Tensor):
        tensor = images.float()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(1)
        if tensor.shape[1] == 3:
            tensor = tensor.mean(1, keepdim=True)
    else:
        raise ValueError(f"images of type {type(images).__name__}: expected PIL images, numpy arrays or tensors")
    if tensor.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        tensor = torch.nn.functional.interpolate(tensor, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return tensor


@torch.no_grad()
def classify(images, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices (into CLASSES) of generated or real Fashion-MNIST images.

    Example:
        >>> out = pipe(["sneaker", "bag"], num_inference_steps=20, generator=torch.Generator().manual_seed(3),
        ...            output_type="np")
        >>> classify(out.images)
        array([7, 8])
        >>> [CLASSES[i] for i in classify(out.images)]
        ['sneaker', 'bag']
    """
    model = load_classifier()
    x = images_to_tensor(images)
    return np.concatenate([model(x[i:i + batch_size]).argmax(-1).numpy() for i in range(0, len(x), batch_size)])
