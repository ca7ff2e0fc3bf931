"""The tiny pipelines of ``tiec.tiny``: every family builds offline, runs, and repeats itself bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiec import tiny

# numpy 2 and torch warnings raised inside diffusers' schedulers and Text2Video-Zero, not by tiec
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
              pytest.mark.filterwarnings("ignore:Default grid_sample:UserWarning")]

VIDEO = {"t2v", "animatediff", "svd"}


def expected_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    if name in VIDEO:
        return (batch, tiny.FRAMES, tiny.SIZE, tiny.SIZE, 3)
    if name == "t2v-zero":
        return (tiny.FRAMES, tiny.SIZE, tiny.SIZE, 3)
    return (batch, tiny.SIZE, tiny.SIZE, 3)


def as_tensor(images) -> torch.Tensor:
    return images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_family_runs_deterministically(name):
    pipe = tiny.build(name)
    first, second = (as_tensor(tiny.run(pipe, name, steps=4)) for _ in range(2))
    assert first.dtype == torch.float32 and tuple(first.shape) == expected_shape(name)
    assert torch.isfinite(first).all() and first.std() > 0
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["if", "svd", "pixart", "sd3", "flux"])
def test_seed_and_guidance_matter(name):
    pipe = tiny.build(name)
    base = as_tensor(tiny.run(pipe, name, steps=2))
    assert not torch.equal(base, as_tensor(tiny.run(pipe, name, steps=2, seed=1)))
    assert not torch.equal(base, as_tensor(tiny.run(pipe, name, steps=2, guidance=1.5)))
    assert not torch.equal(base, as_tensor(tiny.run(tiny.build(name, seed=1), name, steps=2)))


def test_batch_and_denoiser():
    pipe = tiny.build("sd3")
    assert tuple(as_tensor(tiny.run(pipe, "sd3", steps=2, batch=2)).shape) == expected_shape("sd3", batch=2)
    assert tiny.denoiser(pipe) is pipe.transformer
    assert tiny.denoiser(tiny.build("if")) is not None
    assert len(tiny.denoiser(tiny.build("flux")).single_transformer_blocks) >= 2


def test_other_scheduler():
    pipe = tiny.build("pixart", scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert torch.isfinite(as_tensor(tiny.run(pipe, "pixart", steps=3))).all()
    with pytest.raises(ValueError, match="does not fit"):
        tiny.build("flux", scheduler="ddim")
    with pytest.raises(ValueError, match="unknown family"):
        tiny.build("sd2")
