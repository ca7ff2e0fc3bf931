"""DeepCache: schedules, exactness at interval 1, what shallow steps skip, FLOPs, pipelines, combinations."""

import math

import numpy as np
import pytest
import torch
from conftest import demo_sample, make_demo_pipe, make_pipe, module_attributes, run, tiny_unet

import tiec
from tiec.deepcache import full_steps
from tiec.flops import build_sd15_unet, loop_flops

DC = tiec.DeepCacheConfig


@pytest.fixture(scope="module")
def sd_pipe():
    return make_pipe("sd")


@pytest.mark.parametrize("kwargs, field", [
    (dict(cache_interval=0), "cache_interval"), (dict(cache_interval=2.0), "cache_interval"),
    (dict(cache_branch_id=-1), "cache_branch_id"), (dict(schedule="cosine"), "schedule"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DC(**kwargs)


def test_branch_must_fit_the_unet():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"cache_branch_id=2 .* 0\.\.1"):
        tiec.apply(unet, DC(cache_branch_id=2))
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


@pytest.mark.parametrize("branch", [0, 1])
def test_shallow_steps_skip_the_deep_parts_and_reuse_its_feature(branch):
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    calls = {"deep": 0, "shallow": 0}
    hooks = [unet.mid_block.resnets[0].register_forward_hook(lambda *a: calls.__setitem__("deep", calls["deep"] + 1)),
             unet.up_blocks[-1].resnets[0].register_forward_hook(
                 lambda *a: calls.__setitem__("shallow", calls["shallow"] + 1))]
    with torch.no_grad():
        plain = [unet(sample, t, text).sample for t in (900, 500)]
        calls.update(deep=0, shallow=0)
        with tiec.apply(unet, DC(cache_interval=3, cache_branch_id=branch)) as handle:
            handle.start_run(3)
            # step 1 repeats step 0's input: its deep feature is the cached one, so the output is exact
            outs = [unet(sample, t, text).sample for t in (900, 900, 500)]
        assert handle.stats["full_steps"] == 1 and handle.stats["shallow_steps"] == 2
    for hook in hooks:
        hook.remove()
    assert calls == {"deep": 1, "shallow": 3}
    assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1], plain[0])
    assert not torch.allclose(outs[2], plain[1], atol=1e-4)


def test_bare_unet_needs_start_run():
    unet = tiny_unet()
    with tiec.apply(unet, DC()), pytest.raises(RuntimeError, match="start_run"), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 7, 32))


def test_flops_on_sd15_at_fifty_steps():
    unet = build_sd15_unet("meta")
    plain_step = loop_flops(unet, [], num_steps=1)["total"]  # the plain loop costs the same at every step
    cached = loop_flops(unet, [DC()], num_steps=50)
    ratio = cached["total"] / (50 * plain_step)
    print(f"DeepCache interval 3, branch 0, SD1.5 at 50 steps: {ratio:.4f}x the plain loop's UNet FLOPs")
    assert cached["full_steps"] == 17 and cached["shallow_steps"] == 33 and cached["unet_calls"] == 50
    full = set(full_steps(50, 3))
    assert all(f == plain_step for s, f in enumerate(cached["per_step"]) if s in full)
    assert len({f for s, f in enumerate(cached["per_step"]) if s not in full}) == 1
    assert ratio < 0.7


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
    # the 5 merged (full-resolution) blocks all lie on branch 0's shallow path: they run at every step
    assert handle.stats["shallow_steps"] == 4 and handle.stats["merged_blocks"] == 6 * 5
    assert not np.array_equal(deep, both)
