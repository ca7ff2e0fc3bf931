"""torch.compile with tiec: graphs, graph breaks and recompilations, then inductor compile time and speed.

Three ways to compile the demo UNet's architecture (random weights: speed does not depend on them), each plain
and with tiec (`reuse`, serial decoders, key steps every 3rd step):
- `whole`: `unet.compile()`. tiec keeps its step logic out of the graph (torch.compiler.disable), so under tiec
  the compiled whole-model region breaks at once and the UNet runs eagerly: correct, bounded, no speed-up.
- `repeated`: `unet.compile_repeated_blocks()` (diffusers' regional compilation of the transformer blocks).
- `blocks`: every down, mid and up block compiled on its own (tiec's split patches are traced, one graph per
  mode of the split).
Graphs are counted with a counting backend over two pipeline calls (the second must add none: no recompilation
per step or per call); the inductor rows time `--calls` warm calls after one compiling call, plain and tiec
alternating in one run.

    python benchmarks/compile_check.py --steps 20 --images 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build_pipe(seed: int = 0):
    from tiec.demo.model import build_pipeline

    pipe = build_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_unet(unet, how: str, backend) -> None:
    if how == "whole":
        unet.compile(backend=backend)
    elif how == "repeated":
        for module in unet.modules():  # what diffusers' compile_repeated_blocks does, with our backend
            if type(module).__name__ in unet._repeated_blocks:
                module.compile(backend=backend)
    elif how == "blocks":
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.compile(backend=backend)
    else:
        raise ValueError(f"how={how!r}")


def sample(pipe, steps: int, images: int):
    with torch.no_grad():
        return pipe(["sneaker"] * images, num_inference_steps=steps, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def graph_counts(how: str, with_tiec: bool, steps: int, images: int) -> tuple[int, int, int]:
    """(graphs after the first call, graphs added by the second call, graph breaks) with a counting backend."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    import tiec

    dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe = build_pipe()
    handle = tiec.apply(pipe, tiec.EncoderPropagationConfig(key_steps="every:3", parallel=False)) if with_tiec else None
    compile_unet(pipe.unet, how, backend)
    sample(pipe, steps, images)
    first = len(graphs)
    sample(pipe, steps, images)
    breaks = sum(counters["graph_break"].values())
    if handle is not None:
        handle.remove()
    return first, len(graphs) - first, breaks


def inductor_times(how: str, steps: int, images: int, calls: int) -> dict[str, tuple[float, float]]:
    """{"plain"|"tiec": (seconds of the first, compiling call; median seconds of the warm calls)} with inductor.

    The plain and the tiec pipeline are compiled side by side and their warm calls alternate, so that the ratio
    of the two is measured under the same machine load.
    """
    import torch._dynamo as dynamo

    import tiec

    dynamo.reset()
    pipes = {"plain": build_pipe(), "tiec": build_pipe()}
    handle = tiec.apply(pipes["tiec"], tiec.EncoderPropagationConfig(key_steps="every:3", parallel=False))
    first, warm = {}, {name: [] for name in pipes}
    for name, pipe in pipes.items():
        if how != "eager":
            compile_unet(pipe.unet, how, "inductor")
        start = time.perf_counter()
        sample(pipe, steps, images)
        first[name] = time.perf_counter() - start
    for _ in range(calls):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            sample(pipe, steps, images)
            warm[name].append(time.perf_counter() - start)
    handle.remove()
    return {name: (first[name], statistics.median(warm[name])) for name in pipes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="warm calls timed per inductor row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-inductor", action="store_true", help="only count graphs (fast)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"demo UNet architecture (random weights), {args.images} images, {args.steps} DDIM steps, guidance on; "
          f"tiec = reuse, key steps every:3, serial; {args.threads} thread(s)")
    print(f"{'compile':<10} {'tiec':<5} {'graphs':>7} {'new in 2nd call':>16} {'graph breaks':>13}")
    for how in ("whole", "repeated", "blocks"):
        for with_tiec in (False, True):
            first, added, breaks = graph_counts(how, with_tiec, args.steps, args.images)
            print(f"{how:<10} {'yes' if with_tiec else 'no':<5} {first:>7} {added:>16} {breaks:>13}", flush=True)
    if args.no_inductor:
        return 0
    print(f"\ninductor: first (compiling) call and median of {args.calls} warm calls, seconds (plain and tiec "
          f"calls alternate)")
    print(f"{'compile':<10} {'plain first':>12} {'plain warm':>11} {'tiec first':>11} {'tiec warm':>10} "
          f"{'tiec / plain':>13}")
    for how in ("eager", "repeated", "blocks"):
        times = inductor_times(how, args.steps, args.images, args.calls)
        (pf, pw), (tf, tw) = times["plain"], times["tiec"]
        print(f"{how:<10} {pf:>12.2f} {pw:>11.3f} {tf:>11.2f} {tw:>10.3f} {tw / pw:>12.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
