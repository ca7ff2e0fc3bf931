import torch
from torch.utils.flop_counter import FlopCounterMode

import tiec
from conftest import tiny_unet
from tiec.flops import build_sd15_unet, decoder_share, flop_counter, loop_flops


def test_cpu_attention_is_counted_like_the_math_path():
    unet = tiny_unet()
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        with flop_counter() as ours:
            unet(sample, 10, text)
        with FlopCounterMode(display=False) as stock:
            unet(sample, 10, text)
        meta = tiny_unet().to("meta")
        with flop_counter() as on_meta:  # meta tensors take the math path: plain matmuls, counted by torch
            meta(sample.to("meta"), 10, text.to("meta"))
    assert ours.get_total_flops() == on_meta.get_total_flops()
    assert stock.get_total_flops() < ours.get_total_flops()  # the stock counter misses the CPU attention op


def test_sd15_faster_diffusion_flops_match_the_encoder_skip():
    unet = build_sd15_unet("meta")
    sample, text = torch.randn(2, 4, 64, 64, device="meta"), torch.randn(2, 77, 768, device="meta")
    share = decoder_share(unet, sample, text)
    assert 0.6 < share < 0.75  # the encoder is about a third of SD1.5's UNet
    with torch.no_grad(), flop_counter() as one:
        unet(sample, 999, text)
    fd = loop_flops(unet, [tiec.EncoderPropagationConfig()], num_steps=50, encoder_hidden_states=text)
    assert fd["encoder_runs"] == 9 and fd["decoder_runs"] == 50
    ratio = fd["total"] / (50 * one.get_total_flops())
    expected = (9 + 41 * share) / 50
    assert abs(ratio - expected) / expected < 0.01
    assert ratio <= 0.74
