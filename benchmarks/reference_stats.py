"""The shipped FID reference statistics of the Fashion-MNIST test set: compute them, choose their storage, check them.

1. InceptionV3 pool features of the 10,000 test images (tiec's FID network and input convention), computed in
   chunks of 500 and kept in ``WORK/features-NNNNN.npy`` so that a stopped run resumes.
2. The statistics (mean, covariance) stored three ways: float64, float32, and float16 upper triangle; for each,
   the FID of two image sets against them (1,000 training images: real data; and 1,000 test images with
   Gaussian pixel noise, a worse set) compared with the float64 statistics.
3. With ``--write``, the smallest storage whose FIDs differ from float64's by less than 0.01 goes to
   ``src/tiec/demo/fashion_mnist/reference-stats.npz``, with the key ``tiec.eval.fid`` checks before using it.

    OMP_NUM_THREADS=1 python benchmarks/reference_stats.py --work /work/tiec-ref --threads 1 [--write]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch

CHUNK = 500


def main(argv: list[str] | None = None) -> None:
    from tiec.demo.data import load_fashion_mnist
    from tiec.eval import fid
    from tiec.eval.metrics import frechet_distance_to_features

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder for the feature chunks (resumable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the shipped statistics file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    net = fid.InceptionFeatures(progress=False)
    test, _ = load_fashion_mnist("test")
    chunks = []
    for start in range(0, len(test), CHUNK):
        path = work / f"features-{start:05d}.npy"
        if not path.is_file():
            t0 = time.time()
            np.save(path, net(test[start:start + CHUNK]))
            print(f"features {start}..{start + CHUNK - 1}: {time.time() - t0:.0f} s", flush=True)
        chunks.append(np.load(path))
    features = np.concatenate(chunks)
    mu, sigma = fid.gaussian_stats(features)

    train, _ = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    real = train[rng.permutation(len(train))[:1000]]
    noisy = np.clip(test[rng.permutation(len(test))[:1000]].astype(np.float64)
                    + rng.normal(0, 40, (1000,) + test.shape[1:]), 0, 255).astype(np.uint8)
    sets = {"1,000 training images": net(real), "1,000 noisy test images": net(noisy)}
    exact = {name: frechet_distance_to_features(f, mu, sigma) for name, f in sets.items()}
    print("FID against the float64 statistics: " + ", ".join(f"{n} {v:.4f}" for n, v in exact.items()))
    chosen = None
    for storage in ("float16", "float32"):
        packed = fid.pack_stats(mu, sigma, storage)
        size = len(_npz_bytes(packed))
        mu2, sigma2 = fid.unpack_stats(packed)
        diffs = {n: abs(frechet_distance_to_features(f, mu2, sigma2) - exact[n]) for n, f in sets.items()}
        print(f"{storage} upper triangle: {size / 1e6:.2f} MB compressed; |FID - FID(float64)|: "
              + ", ".join(f"{n} {d:.5f}" for n, d in diffs.items()), flush=True)
        if chosen is None and max(diffs.values()) < 0.01:
            chosen = (storage, packed)
    if args.write:
        if chosen is None:
            raise SystemExit("no storage reproduces the float64 FIDs within 0.01; nothing written")
        storage, packed = chosen
        key = fid.fashion_mnist_key(net.name, test, None)
        out = fid.write_shipped_stats(packed, key)
        print(f"wrote {out} ({storage}; key {key})")


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
