"""Quality of demo weights folders side by side (e.g. training snapshots against the shipped release).

For each folder ("shipped" = the weights in the package): N DDIM-50 samples (classes cycled, seeds 0..N-1, the
pipeline's default guidance), their FID against a fixed 500-image subset of the Fashion-MNIST test set (biased
upward by the small sizes: compare folders with each other only), classifier adherence and frame speckle. With
``TIEC_SNAPSHOT_REFERENCE=all`` the FID is against all 10,000 test images (the shipped statistics): with N = 1000,
issue 14's protocol. ``TIEC_SNAPSHOT_GUIDANCE=G`` samples with guidance G instead of the pipeline's default.

    python benchmarks/demo_snapshots.py THREADS N shipped RUN/snapshots/001000 ...
"""
import os
import sys
import time

import numpy as np
import torch

STEPS = 50


def sample(pipe, prompts, seeds, **kwargs):
    """DDIM-50 images (N, 28, 28, 1) in [0, 1] of ``prompts`` with generators seeded ``seeds``, in batches of 50, and
    their uncropped 32x32 samples before the crop (for the speckle figure)."""
    images, samples, seeds = [], [], list(seeds)
    for start in range(0, len(seeds), 50):
        cap = []

        def keep_last(pipe, i, t, tensors):
            if i == STEPS - 1:
                cap.append(tensors["latents"].clone())
            return tensors

        with torch.no_grad():
            out = pipe(prompts[start:start + 50], num_inference_steps=STEPS, output_type="np",
                       generator=[torch.Generator().manual_seed(s) for s in seeds[start:start + 50]],
                       callback_on_step_end=keep_last, **kwargs)
        images.append(out.images)
        samples.append(((cap[0].float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy())
    return np.concatenate(images), np.concatenate(samples)


def main() -> None:
    from tiec.demo import classify
    from tiec.demo.model import CLASSES, load_pipeline
    from tiec.eval.fid import InceptionFeatures, fashion_mnist_reference
    from tiec.eval.metrics import frame_speckle, frechet_distance_to_features

    torch.set_num_threads(int(sys.argv[1]))
    n = int(sys.argv[2])
    net = InceptionFeatures()
    count = None if os.environ.get("TIEC_SNAPSHOT_REFERENCE") == "all" else 500
    (mu, sigma), what = fashion_mnist_reference(net, count)
    print(what, flush=True)
    guidance = os.environ.get("TIEC_SNAPSHOT_GUIDANCE")
    extra = {} if guidance is None else {"guidance_scale": float(guidance)}
    for wd in sys.argv[3:]:
        t0 = time.time()
        pipe = load_pipeline(weights_dir=None if wd == "shipped" else wd)
        images, samples = sample(pipe, [CLASSES[i % 10] for i in range(n)], range(n), **extra)
        u8 = (images[..., 0] * 255).round().astype(np.uint8)
        fid = frechet_distance_to_features(net(u8), mu, sigma)
        acc = float((np.asarray(classify(images)) == np.array([i % 10 for i in range(n)])).mean())
        speckle = float(frame_speckle(samples).mean())
        print(f"{wd}: FID({n}) {fid:.2f} adherence {acc:.3f} speckle {speckle:.4f} ({time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
