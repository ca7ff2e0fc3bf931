"""The namespace of the docstring examples in ``src/tiec`` (``pytest --doctest-modules``); not shipped with tiec.

Besides ``tiec``, ``torch`` and ``np``, an example may use, freshly built for it and only when it names them:

- ``pipe``: the trained demo pipeline (``tiec.demo.load_pipeline()``, weights inside the package, fast on a CPU;
  its prompts name a Fashion-MNIST class, "a photo of a bag");
- ``unet``: a tiny random-weight Stable Diffusion shaped UNet (``tiec.testing.TINY_SD_UNET_CONFIG``);
- ``scheduler``: a DDIM scheduler with Stable Diffusion's betas, ``set_timesteps(10)`` done.

Examples run in a temporary folder (what they write stays out of the repository), with the FID statistics cache
(``TIEC_CACHE_DIR``) there too and the Hugging Face hub offline.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from threads, and threads oversubscribe a shared 2-core machine badly.
torch.set_num_threads(1)


def _pipe():
    import tiec.demo

    return tiec.demo.load_pipeline()


def _unet():
    from diffusers import UNet2DConditionModel

    from tiec.testing import TINY_SD_UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SD_UNET_CONFIG)


def _scheduler():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(10)
    return scheduler


_BUILDERS = {"pipe": _pipe, "unet": _unet, "scheduler": _scheduler}


@pytest.fixture(autouse=True)
def _doctest_namespace(request, doctest_namespace):
    test = getattr(request.node, "dtest", None)  # only doctest items have one
    if test is None:
        yield
        return
    import tiec
    import tiec.demo  # examples may name tiec.demo.load_pipeline() without importing it

    source = "\n".join(example.source for example in test.examples)
    doctest_namespace.update(tiec=tiec, torch=torch, np=np)
    for name, build in _BUILDERS.items():  # fresh objects: an example may change them (apply, a new scheduler)
        if re.search(rf"(?<![\w.]){name}\b", source):
            doctest_namespace[name] = build()
        else:
            doctest_namespace.pop(name, None)
    tmp_path = request.getfixturevalue("tmp_path")
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIEC_CACHE_DIR", str(tmp_path / "cache"))
    yield
