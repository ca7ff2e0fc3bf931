"""Cost of one TIEC feature blend relative to one decoder step, at Stable Diffusion 1.5 feature sizes.

Builds the SD1.5 UNet (random weights; speed does not depend on them), captures the encoder features of
one guided call (batch 2) at 512 px, then times, each as the median of repeats after a warm-up:
- one decoder step (the UNet with its encoder skipped, as encoder propagation runs it),
- one ``extrapolate`` blend of every feature tensor (``interpolate`` costs the same blend).

Usage: python benchmarks/blend_cost.py [--resolution 512] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tiec import estimators
from tiec._part import Part
from tiec.flops import build_sd15_unet
from tiec.split import EncoderSplit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = build_sd15_unet("cpu").to(device).eval()
    part = Part(None, unet, None)
    part.install()
    split = EncoderSplit(part, unet)
    size = args.resolution // 8
    sample = torch.randn(2, 4, size, size, device=device)
    text = torch.randn(2, 77, 768, device=device)
    try:
        with torch.no_grad():
            _, f1 = split.capture(lambda: unet(sample, 800, text))
            _, f2 = split.capture(lambda: unet(sample, 700, text))
            decoder = _median_seconds(lambda: split.decode(lambda: unet(sample, 650, text), f2), args.repeats, device)
            blend = _median_seconds(lambda: estimators.extrapolate(f1, f2, 800.0, 700.0, 650.0), args.repeats * 4,
                                    device)
    finally:
        part.detach()
    numel = sum(f.numel() for f in f1)
    print(f"SD1.5 UNet, {args.resolution} px, batch 2 (guided), {device.type}, torch {torch.__version__}")
    print(f"encoder features: {len(f1)} tensors, {numel / 1e6:.2f} M values")
    print(f"one decoder step: {decoder * 1e3:9.2f} ms (median of {args.repeats})")
    print(f"one blend       : {blend * 1e3:9.3f} ms (median of {args.repeats * 4})")
    print(f"blend / decoder : {100 * blend / decoder:.3f} %  (target < 1 %)")
    return {"decoder_s": decoder, "blend_s": blend, "ratio": blend / decoder}


if __name__ == "__main__":
    main()
