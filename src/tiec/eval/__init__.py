"""Evaluation harness: ``tiec bench`` and the metrics it reports (FID, adherence, CLIPScore, PSNR, SSIM, cost).

Example (a quick run: 4 methods x 40 images, with FID, takes minutes on a CPU; see ``run_bench`` for a tiny one):
    >>> from tiec.eval import BenchSettings, run_bench
    >>> rows = run_bench(BenchSettings.create(quick=True, model="demo-random", out="runs/quick"))  # doctest: +SKIP
"""

from .bench import BenchSettings, run_bench
from .metrics import frechet_distance, frechet_distance_to_features, gaussian_stats, psnr, ssim
from .report import gap_recovery, write_report

__all__ = ["BenchSettings", "frechet_distance", "frechet_distance_to_features", "gap_recovery", "gaussian_stats", "psnr", "run_bench", "ssim",
           "write_report"]
