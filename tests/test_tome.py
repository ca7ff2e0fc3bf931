"""Token merging: the matching kernels on hand-made tokens, exactness at ratio 0, FLOPs, pipelines, combinations."""

import warnings

import numpy as np
import pytest
import torch
from conftest import demo_sample, make_demo_pipe, make_pipe, module_attributes, run, tiny_unet

import tiec
from tiec.flops import flop_counter
from tiec.merge import bipartite_soft_matching, grid_partition

ToMe = tiec.TokenMergingConfig
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(scope="module")
def sd_pipe():
    return make_pipe("sd")


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio="half"), "ratio"),
    (dict(max_downsample=3), "max_downsample"), (dict(max_downsample=0), "max_downsample"),
    (dict(sx=0), "sx"), (dict(sy=1.5), "sy"), (dict(use_rand=1), "use_rand"),
    (dict(merge_attn=False), "merge_attn"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ToMe(**kwargs)


# -- kernels ---------------------------------------------------------------------------------------
def test_partition_one_destination_per_cell():
    dst, src = grid_partition(4, 4, 2, 2)
    assert dst.tolist() == [0, 2, 8, 10]  # the first token of each cell without a generator
    assert sorted(dst.tolist() + src.tolist()) == list(range(16))
    # 5 x 6 grid, 2 x 2 cells: 2 x 3 whole cells, the last row holds sources only
    g = torch.Generator().manual_seed(3)
    dst, src = grid_partition(5, 6, 2, 2, g)
    assert len(dst) == 6 and len(src) == 24 and sorted(dst.tolist() + src.tolist()) == list(range(30))
    cells = {(int(i) // 6 // 2, int(i) % 6 // 2) for i in dst}
    assert cells == {(y, x) for y in range(2) for x in range(3)} and all(int(i) < 24 for i in dst)
    assert torch.equal(dst, grid_partition(5, 6, 2, 2, torch.Generator().manual_seed(3))[0])


def test_identical_pair_merges_and_unmerges_exactly():
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = x[:, 0]  # token 5 is a source (cell 0 holds 0, 1, 4, 5; 0 is its destination)
    merge, unmerge = bipartite_soft_matching(x, 4, 4, 2, 2, r=1)
    merged = merge(x)
    assert merged.shape == (2, 15, 64)
    assert torch.equal(merged[:, -4:], x[:, [0, 2, 8, 10]])  # destinations last; the mean of two equal tokens
    kept = [i for i in range(16) if i not in (0, 2, 8, 10, 5)]
    assert torch.equal(merged[:, :11].sort(dim=1).values, x[:, kept].sort(dim=1).values)
    assert torch.equal(unmerge(merged), x)


def test_merge_is_the_mean_and_counts_are_n_minus_r():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 32, generator=g)
    x[:, 1] = x[:, 0] + 0.01 * torch.randn(32, generator=g)
    x[:, 4] = x[:, 0] + 0.01 * torch.randn(32, generator=g)
    merge, unmerge = bipartite_soft_matching(x, 4, 4, 2, 2, r=2)
    merged = merge(x)
    torch.testing.assert_close(merged[:, -4], (x[:, 0] + x[:, 1] + x[:, 4]) / 3, rtol=0, atol=1e-6)
    restored = unmerge(merged)
    assert torch.equal(restored[:, 1], merged[:, -4]) and torch.equal(restored[:, 4], merged[:, -4])
    for r in (0, 1, 7, 12, 50):  # 12 sources: r is capped there
        merge, unmerge = bipartite_soft_matching(x, 4, 4, 2, 2, r=r)
        assert merge(x).shape[1] == 16 - min(r, 12) and unmerge(merge(x)).shape == x.shape
    with pytest.raises(ValueError, match="tokens"):
        bipartite_soft_matching(x, 5, 4, 2, 2, r=1)


def test_matching_makes_no_device_copies(monkeypatch):
    """The partition is drawn and indexed on the tokens' device, with a generator of that device."""
    copies = []
    for name in ("cpu", "cuda", "to"):
        def spy(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            copies.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    x = torch.randn(2, 64, 8)
    for generator in (None, torch.Generator().manual_seed(0)):
        merge, unmerge = bipartite_soft_matching(x, 8, 8, 2, 2, r=20, generator=generator)
        unmerge(merge(x))
    assert copies == []
    dst, src = grid_partition(5, 6, 2, 2, torch.Generator().manual_seed(3), device="cpu")
    monkeypatch.undo()
    assert copies == []
    assert dst.device == src.device == torch.device("cpu") and src.tolist() == sorted(src.tolist())


def test_tome_draws_with_its_own_generator_where_the_tokens_are(sd_pipe, monkeypatch):
    import tiec.tome
    seen, original = [], tiec.tome.bipartite_soft_matching

    def spy(metric, *args, **kwargs):
        generator = args[-1] if len(args) == 6 else kwargs.get("generator")
        seen.append((metric.device, None if generator is None else generator.device))
        return original(metric, *args, **kwargs)
    monkeypatch.setattr(tiec.tome, "bipartite_soft_matching", spy)
    user = torch.Generator().manual_seed(0)
    state, user_state = torch.get_rng_state(), user.get_state()
    with tiec.apply(sd_pipe, ToMe(use_rand=True)):
        first = run(sd_pipe, "sd", steps=2)
        second = run(sd_pipe, "sd", steps=2)
    assert np.array_equal(first, second)  # deterministic: tiec's generator restarts at every call
    assert seen and all(device == generator for device, generator in seen)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(user.get_state(), user_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tome_on_cuda_draws_on_the_device_without_syncs():
    device = torch.device("cuda")
    x = torch.randn(2, 256, 32, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        merge, unmerge = bipartite_soft_matching(x, 16, 16, 2, 2, r=128, generator=generator)
        out = unmerge(merge(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and out.device.type == "cuda"
    unet = tiny_unet().to(device)
    sample, text = torch.randn(2, 4, 16, 16, device=device), torch.randn(2, 7, 32, device=device)
    with torch.no_grad(), tiec.apply(unet, ToMe(ratio=0.5)) as handle:
        outs = []
        for _ in range(2):
            handle.start_run(1)  # restarts tiec's generators
            outs.append(unet(sample, 500, text).sample)
        part = handle.parts[0]
        assert [g.device.type for g in part._generators.values()] == ["cuda"]
    assert torch.equal(outs[0], outs[1])


# -- on models -------------------------------------------------------------------------------------
def test_ratio_zero_is_bitwise_plain_and_removal_restores(sd_pipe):
    unet = sd_pipe.unet
    before = module_attributes(unet)
    plain = run(sd_pipe, "sd", steps=4)
    with tiec.apply(sd_pipe, ToMe(ratio=0.0)) as handle:
        assert np.array_equal(run(sd_pipe, "sd", steps=4), plain)
        assert handle.stats["merged_blocks"] == 0
    with tiec.apply(sd_pipe, ToMe(ratio=0.5)) as handle:
        merged = run(sd_pipe, "sd", steps=4)
        assert np.array_equal(run(sd_pipe, "sd", steps=4), merged)  # tiec's generator restarts per call
        assert handle.stats["merged_blocks"] == 4 * 5  # 2 down + 3 up blocks at full resolution
    assert not np.array_equal(merged, plain)
    assert np.array_equal(run(sd_pipe, "sd", steps=4), plain)
    assert module_attributes(unet) == before


def test_attention_flops_drop_as_the_token_count_predicts():
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)

    def attn1_counts():
        with torch.no_grad(), flop_counter() as counter:
            out = unet(sample, 500, text).sample
        return out, {k: {str(op): n for op, n in v.items()} for k, v in counter.get_flop_counts().items()
                     if k.endswith(".attn1")}

    plain_out, plain = attn1_counts()
    with tiec.apply(unet, ToMe(ratio=0.5)):
        merged_out, merged = attn1_counts()
    assert not torch.allclose(plain_out, merged_out, atol=1e-4)
    tokens, kept = 256, 256 - int(0.5 * 256)  # a 16 x 16 latent; 128 of the 192 sources merge
    full_res = [k for k in plain if ".mid_block." not in k]
    assert len(full_res) == 5
    for name in plain:
        if name not in full_res:
            assert merged[name] == plain[name]  # the mid block (8 x 8) is beyond max_downsample=1
            continue
        for op, flops in plain[name].items():
            # projections are linear in the token count, the attention product quadratic
            expected = flops * kept ** 2 // tokens ** 2 if op == SDPA else flops * kept // tokens
            assert merged[name][op] == expected, (name, op)
    before = sum(sum(plain[k].values()) for k in full_res)
    after = sum(sum(merged[k].values()) for k in full_res)
    print(f"attn1 FLOPs of the merged layers at ratio 0.5: {after / before:.4f}x of plain")
    assert after / before == pytest.approx(0.3, abs=1e-12)  # (1/2 * 4 + 1/4 * 16) / 20 for this layout


def test_odd_batch_uses_the_fixed_partition(sd_pipe):
    # guidance 1: a batch of one, so random and fixed partitions must give the same image
    with tiec.apply(sd_pipe, ToMe(use_rand=True)):
        rand = run(sd_pipe, "sd", steps=3, guidance=1.0)
    with tiec.apply(sd_pipe, ToMe(use_rand=False)):
        fixed = run(sd_pipe, "sd", steps=3, guidance=1.0)
    assert np.array_equal(rand, fixed)


def test_sdxl_merges_at_the_second_level():
    pipe = make_pipe("sdxl")
    plain = run(pipe, "sdxl", steps=3)
    # SDXL has no attention at full resolution (its config's first down block is a plain DownBlock2D)
    assert pipe.unet.config.down_block_types[0] == "DownBlock2D"
    assert tiec.tome.first_attention_downsample(pipe.unet) == 2
    with tiec.apply(pipe, ToMe(ratio=0.5)) as handle, \
            pytest.warns(UserWarning, match="nothing.*max_downsample=1 times smaller.*max_downsample=2") as caught:
        assert np.array_equal(run(pipe, "sdxl", steps=3), plain) and handle.stats["merged_blocks"] == 0
    assert sum("merged nothing" in str(w.message) for w in caught) == 1  # once, not per UNet call
    with tiec.apply(pipe, ToMe(ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True)) as handle, \
            warnings.catch_warnings():
        warnings.filterwarnings("error", message="ToMe merged nothing")
        out = run(pipe, "sdxl", steps=3)
    # 8 x 8 level: 1 down attention x 2 layers, the mid block's 2 layers, 2 up attentions x 2 layers
    assert handle.stats["merged_blocks"] == 3 * (2 + 2 + 4)
    assert handle.stats["merged_layers"] == 3 * handle.stats["merged_blocks"]
    assert not np.array_equal(out, plain)
    assert np.array_equal(run(pipe, "sdxl", steps=3), plain)


def test_demo_pipeline():
    pipe = make_demo_pipe()

    def sample():
        return demo_sample(pipe, 3)
    plain = sample()
    with tiec.apply(pipe, ToMe(ratio=0.5, max_downsample=2)) as handle:
        out = sample()
    assert handle.stats["merged_blocks"] == 3 * 5  # level 1 (16 x 16): two down and three up blocks
    assert out.shape == plain.shape and not np.array_equal(out, plain)
    assert np.array_equal(sample(), plain)


def test_reuse_plus_tome_with_parallel_decoders(sd_pipe):
    reuse_cfg = tiec.EncoderPropagationConfig(key_steps="every:4")
    with tiec.apply(sd_pipe, reuse_cfg):
        reuse = run(sd_pipe, "sd", steps=8)
    with tiec.apply(sd_pipe, ToMe()):
        tome = run(sd_pipe, "sd", steps=8)
    with tiec.apply(sd_pipe, reuse_cfg, ToMe()) as handle:
        both = run(sd_pipe, "sd", steps=8)
    stats = handle.stats
    assert stats["unet_calls"] == 8 and stats["encoder_runs"] == 2 and stats["batched_decoder_calls"] == 2
    assert stats["merged_blocks"] > 0
    assert not np.array_equal(both, reuse) and not np.array_equal(both, tome)
    # With a fixed partition, the batched decoders (batch 2 x 3 steps) merge each sample as the serial ones do.
    outs = {}
    for parallel in (True, False):
        with tiec.apply(sd_pipe, tiec.EncoderPropagationConfig(key_steps="every:4", parallel=parallel),
                        ToMe(use_rand=False)):
            outs[parallel] = run(sd_pipe, "sd", steps=8)
    assert np.abs(outs[True] - outs[False]).max() < 1e-4
