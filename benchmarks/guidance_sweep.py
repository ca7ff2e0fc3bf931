"""Choose the demo model's default guidance without looking at the test set.

For each guidance scale: N DDIM-50 samples (classes cycled, seeds 10000..10000+N-1, disjoint from the evaluation
seeds 0..999 and from the calibration seeds), their FID against a fixed 2,000-image subset of the Fashion-MNIST
*training* split (the test split stays untouched for the reported figure), classifier adherence and frame speckle.
FID against 2,000 images with a few hundred samples is biased upward: compare the rows with each other only.
The item ``ref`` loads (computes once, then caches) the reference statistics at that point, so that two processes
can share the work: one computes the reference while the other samples.

    python benchmarks/guidance_sweep.py THREADS N ref 2.0 1.5
    python benchmarks/guidance_sweep.py THREADS N 3.0 2.5 ref
"""
import sys
import time

import numpy as np
import torch
from demo_snapshots import sample  # benchmarks/ is the script's folder, first on sys.path

SEED0 = 10_000
REFERENCE_SIZE = 2_000


def main() -> None:
    from tiec.demo import classify
    from tiec.demo.data import load_fashion_mnist
    from tiec.demo.model import CLASSES, load_pipeline
    from tiec.eval.fid import InceptionFeatures, cached_stats, fashion_mnist_subset
    from tiec.eval.metrics import frame_speckle, frechet_distance_to_features, gaussian_stats
    from tiec.eval.results import array_digest

    torch.set_num_threads(int(sys.argv[1]))
    n = int(sys.argv[2])
    net = InceptionFeatures()
    pipe = load_pipeline()
    prompts = [CLASSES[i % 10] for i in range(n)]
    rows, stats = [], None

    def reference():
        train, _ = load_fashion_mnist("train")
        key = {"kind": "fashion-mnist-train", "network": net.name, "images": array_digest(train),
               "count": REFERENCE_SIZE, "subset_seed": 0}
        return cached_stats(key, lambda: gaussian_stats(net(train[fashion_mnist_subset(REFERENCE_SIZE, len(train))])))

    for item in sys.argv[3:]:
        if item == "ref":
            stats = reference()
            continue
        t0, guidance = time.time(), float(item)
        images, samples = sample(pipe, prompts, range(SEED0, SEED0 + n), guidance_scale=guidance)
        features = net((images[..., 0] * 255).round().astype(np.uint8))
        acc = float((np.asarray(classify(images)) == np.array([i % 10 for i in range(n)])).mean())
        rows.append((guidance, features, acc, float(frame_speckle(samples).mean()), time.time() - t0))
        print(f"guidance {guidance}: sampled ({rows[-1][-1]:.0f} s)", flush=True)
    stats = stats if stats is not None else reference()
    for guidance, features, acc, speckle, _ in rows:
        fid = frechet_distance_to_features(features, *stats)
        print(f"guidance {guidance}: FID({n} vs {REFERENCE_SIZE} train) {fid:.2f} adherence {acc:.3f} "
              f"speckle {speckle:.4f}", flush=True)


if __name__ == "__main__":
    main()
