"""How much the encoder features and the decoder output change between adjacent sampling steps.

FasterDiffusion rests on one observation: the encoder's features (the ``conv_in`` output, every skip of the
down blocks, the mid block) change little from one step to the next, while the decoder's output changes a lot.
:func:`feature_dynamics` measures it for any pipeline with a ``UNet2DConditionModel``-shaped UNet: it runs the
plain sampler once with read-only forward hooks and records, for every UNet call ``s``, the relative change
``||F_s - F_{s-1}|| / ||F_{s-1}||`` (Frobenius norm over the whole batch, guidance halves included) of each
encoder level, of each up block's output (the decoder's features) and of the UNet's output (the noise or v
prediction the sampler consumes).
:func:`write_dynamics` writes it as ``dynamics.json`` and ``dynamics.png``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ._timeline import timestep_value
from ._tree import tree_clone
from .flops import decoder_share

SIGNIFICANT_DIGITS = 5


def encoder_levels(unet: torch.nn.Module) -> list[str]:
    """The names of the encoder features, in the order the up blocks read them.

    ``conv_in``, then per down block ``i`` its resnet outputs ``down{i}.res{j}`` and its downsampler output
    ``down{i}.downsample``, then ``mid`` (absent when the UNet has no mid block).

    Example:
        >>> encoder_levels(tiec.demo.load_pipeline().unet)[:5]  # the shipped demo UNet: two resnets per block
        ['conv_in', 'down0.res0', 'down0.res1', 'down0.downsample', 'down1.res0']
    """
    names = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        names += [f"down{i}.res{j}" for j in range(len(block.resnets))]
        names += [f"down{i}.downsample" for _ in (getattr(block, "downsamplers", None) or ())]
    if unet.mid_block is not None:
        names.append("mid")
    return names


def decoder_levels(unet: torch.nn.Module) -> list[str]:
    """The names of the decoder quantities: each up block's output ``up{i}``, then the UNet's ``output``.

    Example:
        >>> decoder_levels(tiec.demo.load_pipeline().unet)
        ['up0', 'up1', 'up2', 'up3', 'output']
    """
    return [f"up{i}" for i in range(len(unet.up_blocks))] + ["output"]


class _Recorder:
    """The state of one analysis run: the previous step's features and the per-step relative changes."""

    def __init__(self, levels: Sequence[str], decoder: Sequence[str]):
        self.levels, self.decoder = list(levels), list(decoder)
        self.names = self.levels + self.decoder
        self.timesteps: list[float] = []
        self.changes: list[dict[str, torch.Tensor | None]] = []
        self.first_inputs: tuple[tuple, dict] | None = None
        self._previous: dict[str, torch.Tensor] = {}
        self._current: dict[str, torch.Tensor | None] = {}
        self._encoder_seen = 0

    def begin(self, unet, args, kwargs) -> None:
        if self.first_inputs is None:  # kept for the FLOPs count; copies, since pipelines may reuse buffers
            self.first_inputs = (tree_clone(args), tree_clone(kwargs))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.timesteps.append(timestep_value(timestep))
        self._current, self._encoder_seen = {}, 0

    def record(self, name: str, tensor: torch.Tensor) -> None:
        # The change is taken now, before later code can add residuals into this tensor in place.
        previous = self._previous.get(name)
        current = tensor.detach()
        if previous is None or previous.shape != current.shape:
            self._current[name] = None
        else:
            diff = torch.linalg.vector_norm((current - previous).float())
            self._current[name] = diff / torch.linalg.vector_norm(previous.float()).clamp_min(1e-30)
        self._previous[name] = current.clone()

    def encoder_feature(self, tensor: torch.Tensor) -> None:
        if self._encoder_seen >= len(self.levels):
            raise RuntimeError(f"the UNet's encoder produced more than the {len(self.levels)} features its layout "
                               f"names; this UNet layout is not supported")
        self.record(self.levels[self._encoder_seen], tensor)
        self._encoder_seen += 1

    def end(self, unet, args, kwargs, output) -> None:
        if self._encoder_seen != len(self.levels):
            raise RuntimeError(f"the UNet's encoder produced {self._encoder_seen} features, expected "
                               f"{len(self.levels)}; this UNet layout is not supported")
        self.record("output", output[0])
        self.changes.append(dict(self._current))


def _attach(unet: torch.nn.Module, recorder: _Recorder) -> list[torch.utils.hooks.RemovableHandle]:
    """Read-only forward hooks that feed ``recorder`` (each returns None: outputs pass unchanged); the caller
    removes the handles."""
    def feature(module, args, out):
        recorder.encoder_feature(out)

    def skips(module, args, out):
        for res in out[1]:
            recorder.encoder_feature(res)

    def up_block(name):
        def hook(module, args, out):
            recorder.record(name, out)
        return hook

    handles = [unet.register_forward_pre_hook(recorder.begin, with_kwargs=True),
               unet.register_forward_hook(recorder.end, with_kwargs=True),
               unet.conv_in.register_forward_hook(feature)]
    handles += [block.register_forward_hook(skips) for block in unet.down_blocks]
    if unet.mid_block is not None:
        handles.append(unet.mid_block.register_forward_hook(feature))
    handles += [block.register_forward_hook(up_block(f"up{i}")) for i, block in enumerate(unet.up_blocks)]
    return handles


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summary(steps: list[dict[str, Any]], levels: Sequence[str], decoder: Sequence[str]) -> dict[str, Any]:
    per_level = {name: _mean([row["encoder"][name] for row in steps]) for name in levels}
    ups = [name for name in decoder if name != "output"]
    encoder = _mean([row["encoder"][name] for row in steps for name in levels])
    output = _mean([row["decoder"]["output"] for row in steps])
    compared = [row for row in steps if row["decoder"]["output"] is not None]
    below = [row["step"] for row in compared  # the premise, strictly: every encoder level moved less than the output
             if all(v is not None and v < row["decoder"]["output"] for v in row["encoder"].values())]
    mean_below = [row["step"] for row in compared
                  if _mean(list(row["encoder"].values())) < row["decoder"]["output"]]
    return {
        "encoder_mean": encoder,
        "encoder_level_mean": per_level,
        "encoder_max_level_mean": max((v for v in per_level.values() if v is not None), default=None),
        "decoder_level_mean": {name: _mean([row["decoder"][name] for row in steps]) for name in decoder},
        "up_blocks_mean": _mean([row["decoder"][name] for row in steps for name in ups]),
        "output_mean": output,
        "output_to_encoder": output / encoder if output is not None and encoder else None,
        "steps_compared": len(compared),
        "steps_every_encoder_level_below_output": below,
        "steps_encoder_mean_below_output": mean_below,
    }


def feature_dynamics(pipe: Any, prompts: str | Sequence[str] | None = None, num_steps: int = 50, seed: int = 0,
                     **call_kwargs: Any) -> dict[str, Any]:
    """Run ``pipe``'s plain sampler once and record how much each encoder level and the decoder output change
    between adjacent steps.

    Args:
        pipe: a diffusers pipeline whose ``unet`` has ``conv_in``, ``down_blocks``, ``mid_block`` and ``up_blocks``
            (one UNet call per step: the pipeline batches classifier-free guidance). Remove tiec handles first
            to analyse the plain sampler.
        prompts: passed as ``prompt=``; None when ``call_kwargs`` carry ``prompt_embeds`` instead.
        num_steps: ``num_inference_steps``.
        seed: seeds the run's own ``torch.Generator`` (unless ``call_kwargs`` hold a ``generator``).
        call_kwargs: any other pipeline arguments (``guidance_scale``, ``height``, ...).

    Returns:
        A JSON-ready dict: metadata (pipeline, model and scheduler classes, steps, prompts, seed), ``encoder_levels``,
        ``decoder_levels``, ``encoder_flops_share`` (of one full UNet call with the run's first inputs), ``steps``
        (one row per UNet call: ``step``, ``timestep``, ``encoder`` and ``decoder`` mapping each level to its relative
        change since the previous call, None at step 0) and ``summary`` (means over steps and levels, and the steps
        where every encoder level, or their mean, changed less than the output). Nothing stays attached to ``pipe``.

    Example:
        >>> result = feature_dynamics(tiec.demo.load_pipeline(), ["sneaker", "bag"], num_steps=20)
        >>> len(result["steps"]), result["steps"][1]["encoder"]["conv_in"] > 0
        (20, True)
    """
    unet = pipe.unet
    for part in ("conv_in", "down_blocks", "mid_block", "up_blocks"):
        if not hasattr(unet, part):
            raise ValueError(f"pipe.unet ({type(unet).__name__}) has no {part}; feature_dynamics needs a "
                             f"UNet2DConditionModel-shaped UNet")
    levels, decoder = encoder_levels(unet), decoder_levels(unet)
    recorder = _Recorder(levels, decoder)
    kwargs = dict(call_kwargs)
    if prompts is not None:
        kwargs["prompt"] = [prompts] if isinstance(prompts, str) else list(prompts)
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    handles = _attach(unet, recorder)
    try:
        with torch.no_grad():
            pipe(num_inference_steps=num_steps, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if recorder.first_inputs is None:
        raise RuntimeError("the pipeline never called its UNet")
    args, first_kwargs = recorder.first_inputs
    sample = args[0] if args else first_kwargs.pop("sample")
    text = args[2] if len(args) > 2 else first_kwargs.pop("encoder_hidden_states")
    extra = {k: v for k, v in first_kwargs.items() if k not in ("timestep", "return_dict")}
    share = 1.0 - decoder_share(unet, sample, text, **extra)

    steps = []
    for index, (timestep, changes) in enumerate(zip(recorder.timesteps, recorder.changes)):
        value = {name: None if changes.get(name) is None else float(changes[name]) for name in recorder.names}
        steps.append({"step": index, "timestep": timestep, "encoder": {n: value[n] for n in levels},
                      "decoder": {n: value[n] for n in decoder}})
    scheduler = getattr(pipe, "scheduler", None)
    return {
        "pipeline": type(pipe).__name__,
        "model": type(unet).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "prediction_type": getattr(getattr(scheduler, "config", None), "prediction_type", None),
        "num_inference_steps": num_steps,
        "unet_calls": len(steps),
        "prompts": kwargs.get("prompt"),
        "seed": seed,
        "guidance_scale": call_kwargs.get("guidance_scale", getattr(pipe, "guidance_scale", None)),
        "batch": int(sample.shape[0]),
        "encoder_levels": levels,
        "decoder_levels": decoder,
        "encoder_flops_share": share,
        "steps": steps,
        "summary": _summary(steps, levels, decoder),
    }


def _rounded(obj: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _to_json(result: dict[str, Any]) -> str:
    """Indented JSON with one line per step row: small, and a rerun's diff reads step by step."""
    lines = []
    for key, value in result.items():
        if key == "steps":
            value = "[\n" + ",\n".join(f"  {json.dumps(row)}" for row in value) + "\n ]"
        else:
            value = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {value}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def plot_dynamics(result: dict[str, Any]):
    """A matplotlib ``Figure`` (Agg canvas, no global backend change) of the relative changes per step."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("dynamics.png needs matplotlib: pip install matplotlib (or tiec[eval])") from None

    steps = [row for row in result["steps"] if row["decoder"]["output"] is not None]
    x = [row["step"] for row in steps]
    fig = Figure(figsize=(9.0, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    levels = result["encoder_levels"]
    ramp = colormaps["viridis"]
    for i, name in enumerate(levels):
        ax.plot(x, [row["encoder"][name] for row in steps], color=ramp(i / max(1, len(levels) - 1)),
                linewidth=1.1, label=f"enc {name}")
    ups = [name for name in result["decoder_levels"] if name != "output"]
    warm = colormaps["autumn"]
    for i, name in enumerate(ups):
        ax.plot(x, [row["decoder"][name] for row in steps], color=warm(0.75 * i / max(1, len(ups) - 1)),
                linestyle="--", linewidth=1.3, label=f"dec {name}")
    ax.plot(x, [row["decoder"]["output"] for row in steps], color="black", linewidth=2.8, label="dec UNet output")
    ax.set_yscale("log")
    ax.set_xlabel("step s (UNet call index)")
    ax.set_ylabel("relative change  ||F_s - F_{s-1}|| / ||F_{s-1}||")
    ax.grid(True, which="major", alpha=0.3)
    if len(result["steps"]) > 1:  # the timestep of each step, on top (the loop's timesteps need not be linear)
        import numpy as np

        index = [row["step"] for row in result["steps"]]
        times = [row["timestep"] for row in result["steps"]]
        top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, index, times),
                                                   lambda t: np.interp(t, times[::-1], index[::-1])))
        top.set_xlabel("timestep t", fontsize=8)
        top.tick_params(labelsize=7)
    ax.set_title(f"{result['pipeline']} / {result['scheduler']}, {result['unet_calls']} steps: encoder = "
                 f"{100 * result['encoder_flops_share']:.1f}% of UNet FLOPs", fontsize=10)
    ax.legend(fontsize=6.5, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.subplots_adjust(left=0.09, right=0.78, top=0.86, bottom=0.1)
    return fig


def write_dynamics(result: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``dynamics.json`` (floats to 5 significant digits) and ``dynamics.png`` into ``out_dir``, atomically.

    Example:
        >>> json_path, png_path = write_dynamics(feature_dynamics(pipe, ["sneaker"]), "runs/analyze")
    """
    from .eval.results import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "dynamics.json", out / "dynamics.png"
    text = _to_json(_rounded(result))
    fig = plot_dynamics(result)
    atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=110))
    return json_path, png_path
