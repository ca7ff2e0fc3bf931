"""The ``tiec`` command line: ``flops``, ``generate``, ``train-demo``, ``bench``."""

from __future__ import annotations

import argparse
import sys


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
    from .demo.train import train_classifier, train_unet

    if args.classifier:
        path, accuracy = train_classifier(args.out, epochs=args.epochs, device=args.device, data_dir=args.data_dir)
        print(f"classifier weights: {path}  test accuracy: {accuracy:.4f}")
        return 0
    path = train_unet(args.out, steps=args.steps, batch_size=args.batch_size, device=args.device,
                      data_dir=args.data_dir, resume=args.resume, lr=args.lr)
    print(f"demo UNet weights: {path}")
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

    p = sub.add_parser("train-demo", help="train the demo Fashion-MNIST UNet (or, with --classifier, its classifier)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=4, help="classifier epochs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--classifier", action="store_true")
    p.set_defaults(func=_train_demo)
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
