"""CLIPScore with a local transformers CLIP model: ``100 * max(cos(image, text), 0)`` per image (Hessel et al. 2021)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


class CLIPScorer:
    """Scores images against their prompts with a CLIP model from a local folder (no download).

    The folder holds what ``CLIPModel.save_pretrained`` writes plus the tokenizer files
    (``CLIPTokenizer``: vocab.json, merges.txt) and, optionally, ``preprocessor_config.json``
    (``CLIPImageProcessor``; default: CLIP's standard preprocessing at the model's image size).

    Args:
        path: the local folder.
        device: where the model runs.
        batch_size: images per forward pass.

    Example (skipped in the test suite: it needs a local CLIP model folder, which tiec does not ship, e.g.
    ``CLIPModel.from_pretrained("openai/clip-vit-large-patch14")`` and its tokenizer saved with ``save_pretrained``):
        >>> scorer = CLIPScorer("models/clip-vit-large-patch14")  # doctest: +SKIP
        >>> scorer(np.zeros((2, 224, 224, 3), np.uint8), ["a red bus", "a cat"]).shape  # doctest: +SKIP
        (2,)
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--clip {path}: not a folder holding a transformers CLIP model")
        self.path, self.device, self.batch_size = str(path), torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        size = self.model.config.vision_config.image_size
        if os.path.isfile(os.path.join(self.path, "preprocessor_config.json")):
            self.processor = CLIPImageProcessor.from_pretrained(self.path, local_files_only=True)
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 77) or 77,
                              self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Per-image CLIPScore of ``images`` (N, H, W[, C], uint8 or [0, 1] floats) against ``prompts``."""
        from .fid import to_uint8

        array = to_uint8(images)
        if array.ndim == 3:
            array = array[..., None]
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if len(array) != len(prompts):
            raise ValueError(f"{len(array)} images but {len(prompts)} prompts; CLIPScore needs one prompt per image")
        scores = []
        for start in tqdm(range(0, len(array), self.batch_size), desc="CLIPScore", unit="batch",
                          disable=len(array) <= self.batch_size, leave=False):
            chunk = list(array[start:start + self.batch_size, ..., :3])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            text = self.tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self.model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"),
                             pixel_values=pixels)
            image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            words = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            scores.append((100.0 * (image * words).sum(-1).clamp(min=0)).cpu().numpy())
        return np.concatenate(scores)
