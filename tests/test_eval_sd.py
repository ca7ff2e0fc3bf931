"""The bench on a local Stable Diffusion folder: prompts file, CLIPScore, FID against a folder, accelerate sharding.

Everything is built offline: a tiny random-weight SD pipeline and a tiny CLIP, with a character-level CLIP
tokenizer written into tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiec.eval import bench as B


class FakeFeatures:
    name = "fake-pixel-stats-v1"

    def __call__(self, images):
        return np.array([[np.mean(im) / 255, np.std(np.asarray(im, float)) / 255, np.mean(np.asarray(im)[..., 0]) / 255]
                         for im in images])


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-character table (printable bytes map to themselves)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tokenizer(folder, max_length: int = 16):
    """A character-level CLIPTokenizer (no merges) saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, local_files_only=True)
    return tokenizer


def text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    tokenizer = write_tokenizer(root / "tok")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("clip")
    tokenizer = write_tokenizer(root)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config(len(tokenizer)), projection_dim=16,
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=30, patch_size=6))
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("a red bus\na cat on a mat\n")
    refs = root / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 16, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    return root


def test_clip_score(clip_folder):
    from tiec.eval.clip import CLIPScorer

    scorer = CLIPScorer(clip_folder, batch_size=2)
    images = np.random.default_rng(1).random((3, 16, 16, 3))
    prompts = ["a red bus", "a cat", "a red bus"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    again = scorer(np.concatenate([images[2:], images[:1]]), ["a red bus", "a red bus"])
    np.testing.assert_allclose(again, [scores[2], scores[0]], rtol=1e-4, atol=1e-4)  # batch-independent
    gray = scorer(images[..., :1], prompts)  # grayscale images are replicated to RGB
    assert gray.shape == (3,)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(images, prompts[:2])


def test_bench_on_a_local_sd_folder(tmp_path, sd_folder, clip_folder, inputs):
    s = B.BenchSettings.create(model=str(sd_folder), methods="full,extrapolate", schedules="ddim3:0/2", num_images=3,
                               batch_size=2, prompts=str(inputs / "prompts.txt"), reference=str(inputs / "refs"),
                               clip=str(clip_folder), out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                               device="cpu")
    rows = B.run_bench(s, extractor=FakeFeatures(), progress=False)
    assert [r["method"] for r in rows] == ["full", "extrapolate"]
    for r in rows:
        assert r["adherence"] is None and 0 <= r["clip_score"] <= 100 and np.isfinite(r["fid"])
        assert "5 images" in r["settings"]["reference"]
    images = np.load(tmp_path / "out/images/ddim3/full.npy")
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert (tmp_path / "out/grid.png").is_file()


def test_model_path_needs_prompts(tmp_path, sd_folder):
    s = B.BenchSettings.create(model=str(sd_folder), methods="full", schedules="ddim2:all", num_images=1,
                               out=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="--prompts"):
        B.run_bench(s, extractor=FakeFeatures(), progress=False)


@pytest.mark.skipif(not os.environ.get("TIEC_SLOW_TESTS"), reason="two accelerate processes: set TIEC_SLOW_TESTS=1")
def test_accelerate_launch_two_cpu_processes(tmp_path, sd_folder, inputs):
    class PoolNet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    net = tmp_path / "poolnet.pt"
    torch.jit.script(PoolNet()).save(str(net))
    common = ["--model", str(sd_folder), "--methods", "full,reuse", "--schedules", "ddim3:0/2", "--num-images", "3",
              "--batch-size", "2", "--prompts", str(inputs / "prompts.txt"), "--reference", str(inputs / "refs"),
              "--fid-network", str(net), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # accelerate's --cpu launcher needs MPI for several processes; --multi_gpu uses torchrun, which works on CPUs
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tiec", "bench"]
    done = subprocess.run(launch + common + ["--out", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "tiec", "bench"] + common + ["--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two/results.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one/results.jsonl").read_text().splitlines()]
    assert [r["settings"]["processes"] for r in two] == [2, 2]
    for a, b in zip(one, two):
        assert a["method"] == b["method"] and a["fid"] == pytest.approx(b["fid"], abs=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "two/images/ddim3/full.npy"),
                               np.load(tmp_path / "one/images/ddim3/full.npy"), atol=1)
