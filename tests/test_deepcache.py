"""DeepCache: schedules, exactness at interval 1, what shallow steps skip, FLOPs, pipelines, combinations."""

import math

import numpy as np
import pytest
import torch
from conftest import demo_sample, make_demo_pipe, make_pipe, module_attributes, run, tiny_unet

import tiec
from tiec.deepcache import deep_parts, full_steps
from tiec.flops import build_sd15_unet, flop_counter, loop_flops

DC = tiec.DeepCacheConfig


@pytest.fixture(scope="module")
def sd_pipe():
    return make_pipe("sd")


@pytest.mark.parametrize("kwargs, field", [
    (dict(cache_interval=0), "cache_interval"), (dict(cache_interval=2.0), "cache_interval"),
    (dict(cache_branch_id=-1), "cache_branch_id"), (dict(schedule="cosine"), "schedule"),
    (dict(estimator="interpolate"), "estimator"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DC(**kwargs)


def test_repr_of_a_plain_config_is_unchanged_by_the_estimator_field():
    # tiec bench's stored row keys are digests of config reprs: a plain DeepCache config keeps its old repr
    assert repr(DC(cache_interval=5)) == "DeepCacheConfig(cache_interval=5, cache_branch_id=0, schedule='uniform')"
    assert repr(DC(estimator="extrapolate")).endswith("schedule='uniform', estimator='extrapolate')")
    assert DC(estimator="extrapolate") != DC()


def test_branch_must_fit_the_unet():
    unet = tiny_unet()  # 6 skip branches: conv_in, 2 resnet layers and the downsampler of block 0, 2 of block 1
    with pytest.raises(ValueError, match=r"cache_branch_id=6 .* 6 skip branches .* 0\.\.5"):
        tiec.apply(unet, DC(cache_branch_id=6))
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_full_step_schedules():
    assert full_steps(10, 3) == (0, 3, 6, 9)
    assert full_steps(7, 1, "non-uniform") == tuple(range(7))
    for steps, interval in ((50, 3), (20, 5), (10, 3), (4, 10)):
        chosen = full_steps(steps, interval, "non-uniform")
        assert chosen[0] == 0 and len(chosen) == math.ceil(steps / interval) == len(set(chosen))
        assert all(0 <= s < steps for s in chosen) and list(chosen) == sorted(chosen)
    chosen = full_steps(50, 3, "non-uniform")
    # dense around the centre (step 15 of 50), sparse at the end: 6 full steps in 10..20 against uniform's 3
    assert sum(10 <= s <= 20 for s in chosen) == 6 > sum(10 <= s <= 20 for s in full_steps(50, 3))
    assert min(np.diff(chosen[-4:])) >= 5


def test_interval_one_is_bitwise_plain_and_removal_restores(sd_pipe):
    unet = sd_pipe.unet
    before = module_attributes(unet)
    plain = run(sd_pipe, "sd", steps=6)
    with tiec.apply(sd_pipe, DC(cache_interval=1)) as handle:
        assert np.array_equal(run(sd_pipe, "sd", steps=6), plain)
    assert dict(handle.stats) == {"unet_calls": 6, "full_steps": 6, "shallow_steps": 0}
    with tiec.apply(sd_pipe, DC(cache_interval=3)) as handle:
        cached = run(sd_pipe, "sd", steps=6)
        assert np.array_equal(run(sd_pipe, "sd", steps=6), cached)  # no state leaks between calls
    assert dict(handle.stats) == {"unet_calls": 6, "full_steps": 2, "shallow_steps": 4}
    assert not np.array_equal(cached, plain)
    assert np.array_equal(run(sd_pipe, "sd", steps=6), plain)
    assert module_attributes(unet) == before


def unit_of(name: str) -> str:
    """The layer a leaf module belongs to: ``down_blocks.0.resnets.1``, ``mid_block.attentions.0``, ``conv_in``."""
    path = name.split(".")
    return ".".join(path[:4] if path[0] in ("down_blocks", "up_blocks") else path[:3] if path[0] == "mid_block"
                    else path[:1])


def units_run(unet, call) -> set[str]:
    """The layers (resnets, attentions, down/upsamplers, conv_in, ...) whose convolutions or linear maps ran.

    Hooks on the leaves, not the layers: a skipped layer may still be called and return without computing.
    """
    ran = set()
    hooks = [m.register_forward_hook(lambda *args, unit=unit_of(name): ran.add(unit))
             for name, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            call()
    finally:
        for hook in hooks:
            hook.remove()
    return ran


def reference_units(unet, branch: int) -> set[str]:
    """The layers DeepCache's reference (``DeepCacheSDHelper``) computes at a retrieval step of ``cache_branch_id``.

    Its rule, for UNets with two layers per block: ``block, layer = divmod(branch, 3)``; a down layer runs if its
    block is earlier, or it is the same block and the layer index is lower; an up layer (indices counted from the
    block's end, blocks from the last; the upsampler is layer 0) runs if its block is earlier, or the same block
    and its index is not higher; the mid block never runs.
    """
    block_id, layer_id = divmod(branch, 3)
    units = {"time_embedding", "conv_in", "conv_out"}

    def add(prefix: str, block, j: int) -> None:
        units.add(f"{prefix}.resnets.{j}")
        if getattr(block, "attentions", None):
            units.add(f"{prefix}.attentions.{j}")
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            if i < block_id or (i == block_id and j < layer_id):
                add(f"down_blocks.{i}", block, j)
        if block.downsamplers and (i < block_id or (i == block_id and len(block.resnets) < layer_id)):
            units.add(f"down_blocks.{i}.downsamplers.0")
    count = len(unet.up_blocks)
    for u, block in enumerate(unet.up_blocks):
        i = count - 1 - u
        for j in range(len(block.resnets)):
            if i < block_id or (i == block_id and len(block.resnets) - 1 - j <= layer_id):
                add(f"up_blocks.{u}", block, j)
        if block.upsamplers and i <= block_id:
            units.add(f"up_blocks.{u}.upsamplers.0")
    return units


# The tiny SD UNet at a shallow step, written out (down block 0: 2 resnet+attention layers and a downsampler;
# up block 1 mirrors it with 3 resnet+attention layers).
SHALLOW_UNITS = {
    0: {"up_blocks.1.resnets.2", "up_blocks.1.attentions.2"},
    1: {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
        "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2"},
    2: {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1",
        "down_blocks.0.attentions.1", *(f"up_blocks.1.{kind}.{j}" for kind in ("resnets", "attentions")
                                        for j in range(3))},
}


@pytest.mark.parametrize("branch", range(6))
def test_shallow_steps_run_the_references_layers(branch):
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    everything = units_run(unet, lambda: unet(sample, 900, text))
    assert {"mid_block.resnets.0", "down_blocks.1.resnets.1", "up_blocks.0.upsamplers.0"} <= everything
    with tiec.apply(unet, DC(cache_interval=2, cache_branch_id=branch)) as handle:
        handle.start_run(4)
        steps = [units_run(unet, lambda: unet(sample, t, text)) for t in (900, 700, 500, 300)]
    assert steps[0] == steps[2] == everything  # full steps run everything
    assert steps[1] == steps[3] == reference_units(unet, branch)
    if branch in SHALLOW_UNITS:
        assert steps[1] == {"time_embedding", "conv_in", "conv_out"} | SHALLOW_UNITS[branch]
    if branch == 5:  # the deepest branch skips the mid block only
        assert steps[1] == everything - {"mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"}


def test_branches_of_a_one_layer_unet():
    """SDXL's tiny layout, one resnet per down block: conv_in, block 0's resnet and downsampler, block 1's layer."""
    unet = tiny_unet(xl=True)
    shallow = {"time_embedding", "add_embedding", "conv_in", "conv_out"}
    expected = {
        0: shallow | {"up_blocks.1.resnets.1"},
        1: shallow | {"down_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"},
        2: shallow | {"down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "up_blocks.0.resnets.1",
                      "up_blocks.0.attentions.1", "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0",
                      "up_blocks.1.resnets.1"},
    }
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 64)
    added = dict(text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6))
    for branch, units in expected.items():
        with tiec.apply(unet, DC(cache_interval=2, cache_branch_id=branch)) as handle:
            handle.start_run(2)
            steps = [units_run(unet, lambda: unet(sample, t, text, added_cond_kwargs=added)) for t in (900, 700)]
        assert steps[1] == units, branch
    with pytest.raises(ValueError, match=r"0\.\.3"):
        tiec.apply(unet, DC(cache_branch_id=4))


@pytest.mark.parametrize("branch", [0, 1, 2, 5])
def test_full_steps_are_plain_and_shallow_steps_reuse_the_deep_feature(branch):
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    before = module_attributes(unet)
    with torch.no_grad():
        plain = [unet(sample, t, text).sample for t in (900, 500)]
        with tiec.apply(unet, DC(cache_interval=3, cache_branch_id=branch)) as handle:
            handle.start_run(4)
            # step 1 repeats step 0's input: its deep feature is the cached one, so the output is exact
            outs = [unet(sample, t, text).sample for t in (900, 900, 500, 500)]
        assert dict(handle.stats) == {"unet_calls": 4, "full_steps": 2, "shallow_steps": 2}
        assert module_attributes(unet) == before
        assert torch.equal(unet(sample, 500, text).sample, plain[1])
    assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1], plain[0])
    assert not torch.allclose(outs[2], plain[1], atol=1e-4)  # shallow, on step 0's deep feature
    assert torch.equal(outs[3], plain[1])  # full


def _feature(out):
    return out if isinstance(out, torch.Tensor) else out[0]  # an attention returns (hidden_states,)


@pytest.mark.parametrize("branch", [0, 2])
def test_extrapolate_forecasts_the_deep_feature_from_the_last_two_full_steps(branch):
    # Independent reference: the deep feature the plain UNet makes at the full steps (a forward hook on the part
    # feeding the shallow path's entry), extrapolated by hand along the timestep.
    unet = tiny_unet()
    feeder = deep_parts(unet, branch)[-1]
    seen = []
    hook = feeder.register_forward_hook(lambda module, args, out: seen.append(_feature(out).clone()))
    samples, text = [torch.randn(2, 4, 16, 16) for _ in range(5)], torch.randn(2, 7, 32)
    times = (900, 800, 700, 600, 500)
    with torch.no_grad():
        plain = [unet(samples[i], times[i], text).sample for i in (0, 2, 4)]
        f900, f700, f500 = seen
        seen.clear()
        with tiec.apply(unet, DC(cache_interval=2, cache_branch_id=branch, estimator="extrapolate")) as handle:
            handle.start_run(5)
            outs = [unet(samples[i], times[i], text).sample for i in range(5)]
        with tiec.apply(unet, DC(cache_interval=2, cache_branch_id=branch)) as handle:
            handle.start_run(5)
            reused = [unet(samples[i], times[i], text).sample for i in range(5)]
    hook.remove()
    assert [torch.equal(outs[i], plain[i // 2]) for i in (0, 2, 4)] == [True] * 3  # full steps: plain
    assert torch.equal(seen[1], f900)  # step 1: one full step so far, so its feature is reused
    # step 3 (t = 600): the line through (900, f900) and (700, f700), half an interval beyond 700
    assert torch.allclose(seen[3], f700 + 0.5 * (f700 - f900), atol=1e-6)
    assert torch.equal(outs[1], reused[1]) and not torch.allclose(outs[3], reused[3], atol=1e-4)


def test_extrapolate_keeps_distinct_timesteps_and_forgets_other_loops():
    unet = tiny_unet()
    feeder = deep_parts(unet, 0)[-1]
    seen = []
    hook = feeder.register_forward_hook(lambda module, args, out: seen.append(_feature(out).clone()))
    samples, text = [torch.randn(2, 4, 16, 16) for _ in range(4)], torch.randn(2, 7, 32)
    with torch.no_grad(), tiec.apply(unet, DC(cache_interval=2, estimator="extrapolate")) as handle:
        # a repeated timestep (Heun's second evaluation) replaces the full step before it: no line through one t
        handle.start_run(4)
        for sample, t in zip(samples, (900, 850, 900, 800)):
            unet(sample, t, text)
        assert torch.equal(seen[3], seen[2])
    hook.remove()
    pipe = make_demo_pipe()
    with tiec.apply(pipe, DC(cache_interval=2, estimator="extrapolate")):
        first = demo_sample(pipe, 6)
        demo_sample(pipe, 6, prompts=("dress", "coat"), seed=1)
        assert np.array_equal(demo_sample(pipe, 6), first)  # the other loop's features are not used
    with tiec.apply(pipe, DC(cache_interval=2)):
        assert not np.array_equal(demo_sample(pipe, 6), first)


def test_extrapolate_runs_on_the_meta_device():
    # FLOP counting: meta timesteps hold no value, so the step index stands in for the timestep
    unet = tiny_unet().to("meta")
    meta = dict(device="meta")
    with torch.no_grad(), tiec.apply(unet, DC(cache_interval=2, estimator="extrapolate")) as handle:
        handle.start_run(4)
        for t in (900, 700, 500, 300):
            out = unet(torch.randn(2, 4, 16, 16, **meta), torch.tensor(t, **meta), torch.randn(2, 7, 32, **meta))
    assert out.sample.device.type == "meta" and handle.stats["shallow_steps"] == 2


def test_bare_unet_needs_start_run():
    unet = tiny_unet()
    with tiec.apply(unet, DC()), pytest.raises(RuntimeError, match="start_run"), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 7, 32))


# The layers of SD1.5 a shallow step runs besides time_embedding, conv_in and conv_out (up block 3 mirrors down
# block 0: three resnet+attention layers).
SD15_SHALLOW = {0: ("up_blocks.3.resnets.2", "up_blocks.3.attentions.2"),
                1: ("down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "up_blocks.3.resnets.1",
                    "up_blocks.3.attentions.1", "up_blocks.3.resnets.2", "up_blocks.3.attentions.2"),
                3: ("down_blocks.0", "up_blocks.2.resnets.2", "up_blocks.2.attentions.2", "up_blocks.2.upsamplers.0",
                    "up_blocks.3")}


@pytest.mark.parametrize("branch, steps", [(0, 50), (1, 7), (3, 7)])
def test_flops_on_sd15(branch, steps):
    unet = build_sd15_unet("meta")
    with torch.no_grad(), flop_counter() as counter:
        unet(torch.randn(2, 4, 64, 64, device="meta"), 999, torch.randn(2, 77, 768, device="meta"))
    layer = {name.removeprefix("UNet2DConditionModel."): sum(ops.values())
             for name, ops in counter.get_flop_counts().items()}
    plain_step = layer["Global"]
    top = ("time_embedding", "conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3",
           "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_out")
    assert sum(layer[name] for name in top) == plain_step  # every counted FLOP lies in a module
    shallow_step = sum(layer[name] for name in ("time_embedding", "conv_in", "conv_out", *SD15_SHALLOW[branch]))
    cached = loop_flops(unet, [DC(cache_interval=3, cache_branch_id=branch)], num_steps=steps)
    full = len(full_steps(steps, 3))
    assert cached["full_steps"] == full and cached["shallow_steps"] == steps - full
    assert cached["per_step"] == [plain_step if s % 3 == 0 else shallow_step for s in range(steps)]
    assert cached["total"] == full * plain_step + (steps - full) * shallow_step
    # TIEC's extrapolation of the cached feature adds no UNet FLOPs
    extrapolated = loop_flops(unet, [DC(cache_interval=3, cache_branch_id=branch, estimator="extrapolate")],
                              num_steps=steps)
    assert extrapolated["per_step"] == cached["per_step"]
    ratio = cached["total"] / (steps * plain_step)
    print(f"DeepCache interval 3, branch {branch}, SD1.5 at {steps} steps: {ratio:.4f}x the plain loop's UNet FLOPs")
    if branch == 0:  # README's figure: a shallow step costs 7.9% of a full one
        assert full == 17 and round(ratio, 4) == 0.3920


@pytest.mark.parametrize("kind", ["sdxl", "img2img", "controlnet"])
def test_other_pipelines(kind):
    pipe = make_pipe(kind)
    plain = run(pipe, kind, steps=5)
    for branch in (0, 1):
        with tiec.apply(pipe, DC(cache_interval=2, cache_branch_id=branch)) as handle:
            out = run(pipe, kind, steps=5)
        runs = 3 if kind == "img2img" else 5  # strength 0.6 runs 3 of 5 steps
        assert dict(handle.stats) == {"unet_calls": runs, "full_steps": (runs + 1) // 2, "shallow_steps": runs // 2}
        assert out.shape == plain.shape and not np.array_equal(out, plain)
    assert np.array_equal(run(pipe, kind, steps=5), plain)


def test_demo_pipeline():
    pipe = make_demo_pipe()

    def sample():
        return demo_sample(pipe, 4)
    plain = sample()
    for branch, schedule in ((0, "uniform"), (2, "non-uniform")):
        with tiec.apply(pipe, DC(cache_interval=2, cache_branch_id=branch, schedule=schedule)) as handle:
            out = sample()
        assert handle.stats["shallow_steps"] == 2 and not np.array_equal(out, plain)
    assert np.array_equal(sample(), plain)


def test_combinations(sd_pipe):
    with pytest.raises(ValueError, match="cannot be combined"):
        tiec.apply(sd_pipe, tiec.EncoderPropagationConfig(), DC())
    with tiec.apply(sd_pipe, tiec.EncoderPropagationConfig()):
        with pytest.raises(ValueError, match="cannot be combined"):
            tiec.apply(sd_pipe, DC())
    with tiec.apply(sd_pipe, DC()):
        deep = run(sd_pipe, "sd", steps=6)
    with tiec.apply(sd_pipe, DC(), tiec.TokenMergingConfig()) as handle:
        both = run(sd_pipe, "sd", steps=6)
    # 5 merged (full-resolution) blocks run at the 2 full steps; of them, branch 0's shallow path holds only the
    # last up layer's
    assert handle.stats["shallow_steps"] == 4 and handle.stats["merged_blocks"] == 2 * 5 + 4 * 1
    assert not np.array_equal(deep, both)
