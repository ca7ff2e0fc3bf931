"""Quality of the embedded demo model with the plain sampler: prompt adherence and FID.

- adherence: ``tiec.demo.classify`` on ``--adherence-images`` samples (an equal share per class), the share
  recognised as the prompted class;
- FID: ``--fid-images`` samples (classes cycled) against the Fashion-MNIST test set (``--reference-size``
  images, all by default), with the standard InceptionV3 FID network (see ``tiec.eval.fid``).

Usage: python benchmarks/demo_quality.py [--steps 50] [--adherence-images 200] [--fid-images 1000]
       [--weights-dir DIR] [--reference-size N] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tqdm.auto import tqdm

from tiec.demo import CLASSES, classify
from tiec.demo.model import DEFAULT_GUIDANCE, load_pipeline
from tiec.eval.fid import InceptionFeatures, fashion_mnist_reference
from tiec.eval.metrics import frechet_distance, gaussian_stats


def sample(pipe, count: int, steps: int, guidance: float, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples with classes cycled, image i from its own generator seeded ``seed + i``."""
    labels = np.arange(count) % len(CLASSES)
    out = []
    for start in tqdm(range(0, count, batch_size), desc=f"sampling {count}"):
        idx = range(start, min(count, start + batch_size))
        out.append(pipe([CLASSES[labels[i]] for i in idx], num_inference_steps=steps, guidance_scale=guidance,
                        generator=[torch.Generator().manual_seed(seed + i) for i in idx], output_type="np").images)
    return np.concatenate(out), labels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--adherence-images", type=int, default=200)
    parser.add_argument("--fid-images", type=int, default=1000)
    parser.add_argument("--reference-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weights-dir", default=None)
    args = parser.parse_args(argv)
    pipe = load_pipeline(weights_dir=args.weights_dir)
    result = {"steps": args.steps, "guidance": args.guidance}
    images, labels = sample(pipe, max(args.adherence_images, args.fid_images), args.steps, args.guidance,
                            args.batch_size)
    n = args.adherence_images
    predicted = classify(images[:n])
    result["adherence"] = float(np.mean(predicted == labels[:n]))
    result["adherence_per_class"] = {c: float(np.mean(predicted[labels[:n] == i] == i)) for i, c in enumerate(CLASSES)}
    if args.fid_images:
        extractor = InceptionFeatures()
        (mu_ref, sigma_ref), what = fashion_mnist_reference(extractor, count=args.reference_size)
        mu, sigma = gaussian_stats(extractor(images[:args.fid_images]))
        result["fid"] = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
        result["fid_reference"] = what
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
