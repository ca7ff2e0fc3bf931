"""Peak memory of encoder propagation's decoders: serial, batched with the default cap, batched without a cap.

Each setting runs in a fresh process: the demo UNet's architecture (random weights), `--images` guided images,
DDIM `--steps` with FasterDiffusion's key steps. On a GPU the figure is `torch.cuda.max_memory_allocated` during
the call; on a CPU it is the growth of the process's peak resident memory (ru_maxrss) during the call, after a
warm-up call of the plain pipeline has sized the allocator.

    python benchmarks/decoder_memory.py --images 16 --steps 50
    python benchmarks/decoder_memory.py --src /path/to/other/tiec/src   # the same for another tiec checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"plain": None, "serial": dict(parallel=False), "batched, max_parallel=8 (default)": dict(),
            "batched, max_parallel=None": dict(max_parallel=None)}

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
import tiec
from tiec.demo.model import build_pipeline
images, steps, setting, device = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
pipe = build_pipeline(0).to(device)
pipe.set_progress_bar_config(disable=True)
def call(n):
    with torch.no_grad():
        pipe(["sneaker"] * images, num_inference_steps=n, output_type="pt", generator=torch.Generator().manual_seed(0))
call(2)
handle = tiec.apply(pipe, tiec.EncoderPropagationConfig(**setting)) if setting is not None else None
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    call(steps); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    call(steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
stats = dict(handle.stats) if handle is not None else {}
print(json.dumps({"peak_bytes": peak, "batched_decoder_calls": stats.get("batched_decoder_calls", 0)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--src", default=None, help="import tiec from this folder instead of the installed one")
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    what = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"demo UNet architecture, {args.images} guided images (batch {2 * args.images}), DDIM {args.steps}, "
          f"faster-diffusion key steps, reuse; {what} during one call on {args.device}")
    for name, setting in SETTINGS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.images), str(args.steps), json.dumps(setting),
                              args.device], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<36} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<36} {result['peak_bytes'] / 2**20:>9.1f} MiB   batched decoder calls "
              f"{result['batched_decoder_calls']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
