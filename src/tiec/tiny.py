"""Tiny random-weight pipelines of more model families, built from configs entirely offline.

DeepFloyd IF (stage I and II), text-to-video (ModelScope, AnimateDiff, Stable Video Diffusion, Text2Video-Zero)
and the transformer families (DiT, PixArt-alpha and -sigma, SD3, Flux), each with the block types and call path
of the full-size model and small enough that a 6-step call takes well under a second on one CPU thread.
Prompt embeddings are passed directly; text encoders and tokenizers are ``None`` wherever the pipeline allows
(Text2Video-Zero only takes prompt strings, so it gets a tiny CLIP text model and an in-memory tokenizer, and
Stable Video Diffusion a tiny CLIP vision encoder). ``tiec.testing`` holds the Stable Diffusion counterparts.

Example:
    >>> from tiec.tiny import build, denoiser, run
    >>> dit = build("dit")
    >>> run(dit, "dit", steps=2).shape
    (1, 32, 32, 3)
    >>> len(denoiser(dit).transformer_blocks)
    4
"""

from __future__ import annotations

import string

import torch

from tiec.testing import TINY_VAE_CONFIG

__all__ = ["FAMILIES", "build", "denoiser", "inputs", "run"]

FAMILIES: tuple[str, ...] = ("if", "if-sr", "t2v", "animatediff", "svd", "t2v-zero", "dit", "pixart",
                             "pixart-sigma", "sd3", "flux")

TEXT_DIM = 32
TEXT_LEN = 8
FRAMES = 3
SIZE = 32

# IF stage I: a pixel-space UNet predicting noise and the variance interpolation (6 output channels), T5-sized
# prompt embeddings projected by ``encoder_hid_dim`` and pooled into the time embedding (``addition_embed_type``).
TINY_IF_UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    cross_attention_dim=32, encoder_hid_dim=TEXT_DIM, attention_head_dim=8, addition_embed_type="text",
    addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
    act_fn="gelu", norm_num_groups=8)

# IF stage II: the noisy image and the upscaled low-resolution image concatenated (6 input channels), the
# low-resolution image's noise level as a timestep class embedding.
TINY_IF_SR_UNET_CONFIG = dict(
    TINY_IF_UNET_CONFIG, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
    time_embedding_act_fn="gelu")

IF_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
    variance_type="learned_range")

# A narrower SD-shaped UNet for the video families, where the batch is multiplied by the frames.
TINY_VIDEO_UNET_CONFIG = dict(
    sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8)

TINY_UNET3D_CONFIG = dict(
    sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8)

TINY_MOTION_ADAPTER_CONFIG = dict(
    block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=8, motion_num_attention_heads=2,
    motion_max_seq_length=8)

# SVD: the noisy latents and the conditioning image's latents concatenated (8 channels), the CLIP image
# embedding as the single cross-attention token, fps / motion bucket / noise augmentation as three time ids.
# Its blocks use 32 normalisation groups, hence 32 channels at least.
TINY_SVD_UNET_CONFIG = dict(
    sample_size=SIZE // 2, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=3 * 8, num_frames=FRAMES)

TINY_SVD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1, sample_size=SIZE)

TINY_CLIP_VISION_CONFIG = dict(
    hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
    image_size=SIZE, patch_size=8)

TINY_CLIP_TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=TEXT_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1)

# SVD's EDM-style Euler: Karras sigmas in [0.002, 700], continuous timesteps (0.25 log sigma), v-prediction.
SVD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    interpolation_type="linear", prediction_type="v_prediction", sigma_min=0.002, sigma_max=700.0,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LINEAR_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")

# The transformers: 8x8 tokens of 2x2 latent patches, learned sigma (twice the input channels out).
TINY_DIT_CONFIG = dict(
    sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=8, num_layers=4, num_attention_heads=2,
    attention_head_dim=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")

TINY_PIXART_CONFIG = dict(
    sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=8, num_layers=4, num_attention_heads=2,
    attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM, norm_type="ada_norm_single",
    use_additional_conditions=False)

TINY_SD3_CONFIG = dict(
    sample_size=SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=4, num_attention_heads=2,
    attention_head_dim=8, joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=16)

# Flux: 2x2-packed 16-channel latents (64 channels), guidance-distilled (guidance embedding, no CFG batch).
TINY_FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=8,
    joint_attention_dim=TEXT_DIM, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))

TINY_SD3_VAE_CONFIG = dict(
    TINY_VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=1.5305, shift_factor=0.0609)
TINY_FLUX_VAE_CONFIG = dict(TINY_SD3_VAE_CONFIG, scaling_factor=0.3611, shift_factor=0.1159)

FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096)

GUIDANCE = {"if": 7.0, "if-sr": 4.0, "t2v": 9.0, "animatediff": 7.5, "svd": 3.0, "t2v-zero": 7.5, "dit": 4.0,
            "pixart": 4.5, "pixart-sigma": 4.5, "sd3": 7.0, "flux": 3.5}

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler"}
_DISCRETE = ("ddim", "ddpm", "dpm", "euler", "euler_a", "pndm", "unipc")
# IF needs a ``variance_type`` (its variance channels), SVD its EDM-style Euler, Text2Video-Zero integer timesteps
# (it indexes ``alphas`` with them); DiT and Flux do not pass the generator to ``step`` or pass custom sigmas.
SCHEDULER_CHOICES = {
    "if": ("ddpm", "dpm"), "if-sr": ("ddpm", "dpm"), "t2v": _DISCRETE, "animatediff": _DISCRETE, "svd": ("euler",),
    "t2v-zero": ("ddim", "ddpm", "dpm", "pndm", "unipc"), "dit": ("ddim", "dpm", "euler", "pndm", "unipc"),
    "pixart": _DISCRETE, "pixart-sigma": _DISCRETE, "sd3": ("flow_euler", "flow_heun"), "flux": ("flow_euler",)}


def _seeded(seed: int, cls, *args, **kwargs):
    torch.manual_seed(seed)
    model = cls(*args, **kwargs)
    return model.eval() if isinstance(model, torch.nn.Module) else model


def _default_scheduler(name: str):
    import diffusers as d
    if name in ("if", "if-sr"):
        return d.DDPMScheduler(**IF_SCHEDULER)
    if name in ("t2v", "t2v-zero"):
        return d.DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "animatediff":
        return d.DDIMScheduler(**LINEAR_SCHEDULER, clip_sample=False, timestep_spacing="linspace", steps_offset=1)
    if name == "svd":
        return d.EulerDiscreteScheduler(**SVD_SCHEDULER)
    if name == "dit":
        return d.DDIMScheduler(**LINEAR_SCHEDULER, clip_sample=False)
    if name in ("pixart", "pixart-sigma"):
        return d.DPMSolverMultistepScheduler(**LINEAR_SCHEDULER)
    if name == "sd3":
        return d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if name == "flux":
        return d.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")


def _scheduler(name: str, choice: str | None):
    import diffusers
    default = _default_scheduler(name)
    if choice is None:
        return default
    if choice not in SCHEDULER_CHOICES[name]:
        raise ValueError(f"scheduler {choice!r} does not fit {name!r}; expected one of {SCHEDULER_CHOICES[name]}")
    extra = dict(skip_prk_steps=True) if choice == "pndm" else {}
    return getattr(diffusers, SCHEDULER_CLASSES[choice]).from_config(default.config, **extra)


def _clip_tokenizer():
    from transformers import CLIPTokenizer
    tokens = ["<|startoftext|>", "<|endoftext|>"] + [c + end for c in string.ascii_lowercase + string.digits
                                                     for end in ("", "</w>")]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=TEXT_LEN)


def build(name: str, seed: int = 0, scheduler: str | None = None):
    """A tiny random-weight pipeline of family ``name`` (one of ``FAMILIES``) with its usual scheduler, or
    ``scheduler`` (a ``SCHEDULER_CLASSES`` key that fits the family) built from the usual one's config."""
    import diffusers as d
    sched = _scheduler(name, scheduler)
    no_text = dict(text_encoder=None, tokenizer=None)
    if name in ("if", "if-sr"):
        config = TINY_IF_UNET_CONFIG if name == "if" else TINY_IF_SR_UNET_CONFIG
        unet = _seeded(seed, d.UNet2DConditionModel, **config)
        extra = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if name == "if":
            pipe = d.IFPipeline(unet=unet, scheduler=sched, **no_text, **extra)
        else:
            noising = d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      beta_start=0.0001, beta_end=0.02)
            pipe = d.IFSuperResolutionPipeline(unet=unet, scheduler=sched, image_noising_scheduler=noising,
                                               **no_text, **extra)
    elif name == "svd":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
        pipe = d.StableVideoDiffusionPipeline(
            vae=_seeded(seed, d.AutoencoderKLTemporalDecoder, **TINY_SVD_VAE_CONFIG),
            image_encoder=_seeded(seed, CLIPVisionModelWithProjection, CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG)),
            unet=_seeded(seed, d.UNetSpatioTemporalConditionModel, **TINY_SVD_UNET_CONFIG), scheduler=sched,
            feature_extractor=CLIPImageProcessor(size=SIZE, crop_size=SIZE))
    elif name in ("t2v", "animatediff", "t2v-zero"):
        vae = _seeded(seed, d.AutoencoderKL, **TINY_VAE_CONFIG)
        if name == "t2v":
            unet = _seeded(seed, d.UNet3DConditionModel, **TINY_UNET3D_CONFIG)
            pipe = d.TextToVideoSDPipeline(vae=vae, unet=unet, scheduler=sched, **no_text)
        elif name == "animatediff":
            unet = _seeded(seed, d.UNet2DConditionModel, **TINY_VIDEO_UNET_CONFIG)
            adapter = _seeded(seed, d.MotionAdapter, **TINY_MOTION_ADAPTER_CONFIG)
            pipe = d.AnimateDiffPipeline(vae=vae, unet=unet, motion_adapter=adapter, scheduler=sched, **no_text)
            pipe.unet.eval()
        else:
            from transformers import CLIPTextConfig, CLIPTextModel
            text_encoder = _seeded(seed, CLIPTextModel, CLIPTextConfig(vocab_size=2 + 2 * 36, **TINY_CLIP_TEXT_CONFIG))
            unet = _seeded(seed, d.UNet2DConditionModel, **TINY_VIDEO_UNET_CONFIG)
            pipe = d.TextToVideoZeroPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
                                             unet=unet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    elif name == "dit":
        pipe = d.DiTPipeline(transformer=_seeded(seed, d.DiTTransformer2DModel, **TINY_DIT_CONFIG),
                             vae=_seeded(seed, d.AutoencoderKL, **TINY_VAE_CONFIG), scheduler=sched)
    elif name in ("pixart", "pixart-sigma"):
        cls = d.PixArtAlphaPipeline if name == "pixart" else d.PixArtSigmaPipeline
        pipe = cls(transformer=_seeded(seed, d.PixArtTransformer2DModel, **TINY_PIXART_CONFIG),
                   vae=_seeded(seed, d.AutoencoderKL, **TINY_VAE_CONFIG), scheduler=sched, **no_text)
    elif name == "sd3":
        pipe = d.StableDiffusion3Pipeline(
            transformer=_seeded(seed, d.SD3Transformer2DModel, **TINY_SD3_CONFIG),
            vae=_seeded(seed, d.AutoencoderKL, **TINY_SD3_VAE_CONFIG), scheduler=sched,
            **no_text, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    elif name == "flux":
        pipe = d.FluxPipeline(
            transformer=_seeded(seed, d.FluxTransformer2DModel, **TINY_FLUX_CONFIG),
            vae=_seeded(seed, d.AutoencoderKL, **TINY_FLUX_VAE_CONFIG), scheduler=sched,
            **no_text, text_encoder_2=None, tokenizer_2=None)
    else:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(name: str, steps: int = 6, seed: int = 0, guidance: float | None = None, batch: int = 1) -> dict:
    """Call arguments for ``build(name)``: prompt embeddings drawn from a fixed generator, a fresh
    ``generator`` seeded with ``seed``, 32 px images (3 frames for video), numpy output."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    g = torch.Generator().manual_seed(1234)
    scale = GUIDANCE[name] if guidance is None else guidance
    args = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")

    def embeds(*shape):
        return torch.randn(batch, *shape, generator=g)

    if name == "svd":
        args.update(image=torch.rand(batch, 3, SIZE, SIZE, generator=g), num_frames=FRAMES,
                    decode_chunk_size=FRAMES, min_guidance_scale=min(1.0, scale), max_guidance_scale=scale)
    elif name == "t2v-zero":
        if batch != 1 or scale <= 1:
            raise ValueError("TextToVideoZeroPipeline makes one video per call (batch=1) and needs guidance > 1")
        t1 = min(max(steps - 3, 1), steps - 1)
        args.update(prompt=["a cat"], negative_prompt=["dull"], video_length=FRAMES, t1=t1,
                    t0=max(t1 - 3, 0), motion_field_strength_x=1.0, motion_field_strength_y=1.0)
    elif name == "dit":
        args.update(class_labels=torch.randint(0, 1000, (batch,), generator=g).tolist())
    else:
        args.update(prompt_embeds=embeds(TEXT_LEN, TEXT_DIM))
        if name != "flux":
            args.update(negative_prompt_embeds=embeds(TEXT_LEN, TEXT_DIM))
        if name in ("pixart", "pixart-sigma"):
            mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
            mask[:, TEXT_LEN - 2:] = 0
            args.update(negative_prompt=None, prompt_attention_mask=mask,
                        negative_prompt_attention_mask=mask.clone(), use_resolution_binning=False)
        elif name == "sd3":
            args.update(pooled_prompt_embeds=embeds(32), negative_pooled_prompt_embeds=embeds(32))
        elif name == "flux":
            args.update(pooled_prompt_embeds=embeds(32))
        elif name == "if-sr":
            args.update(image=torch.rand(batch, 3, SIZE // 2, SIZE // 2, generator=g) * 2 - 1)
        elif name in ("t2v", "animatediff"):
            args.update(num_frames=FRAMES)
    if name != "svd":
        args.update(guidance_scale=scale)
    if name != "dit":
        args.update(height=SIZE, width=SIZE)
    return args


def run(pipe, name: str, **kw):
    """The images (or video frames) of one call of ``pipe``; ``steps``, ``seed``, ``guidance`` and ``batch`` go
    to ``inputs(name)``, any other keyword overrides a call argument."""
    own = {k: kw.pop(k) for k in ("steps", "seed", "guidance", "batch") if k in kw}
    args = inputs(name, **own)
    args.update(kw)
    with torch.no_grad():
        out = pipe(**args)
    return out.frames if hasattr(out, "frames") else out.images


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising model: its transformer or UNet."""
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet
