"""Training of the demo UNet and classifier: fixed seed, progress bar, periodic checkpoints, resume."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_fashion_mnist
from .model import NULL_CLASS, Classifier, build_pipeline, pad_images

LABEL_DROPOUT = 0.1  # share of training examples shown with the null prompt, for classifier-free guidance


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}; use 'auto', 'cpu' or 'cuda'")
    return torch.device(device)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    # Derived from (seed, step) alone, so a resumed run sees the same batches as an uninterrupted one.
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=g)


def train_unet(out: str | Path, steps: int = 6000, batch_size: int = 64, lr: float = 5e-4, device: str = "auto",
               data_dir: str | None = None, resume: bool = False, seed: int = 0, ema_decay: float = 0.999,
               checkpoint_every: int = 250, log_every: int = 50) -> Path:
    """Train the demo UNet (epsilon prediction, label dropout for guidance, EMA); returns the exported weights file.

    Example:
        >>> train_unet("runs/demo", steps=200)
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    images, labels = load_fashion_mnist("train", data_dir)
    x_all, y_all = pad_images(torch.from_numpy(images)), torch.from_numpy(labels)
    pipe = build_pipeline(seed)
    unet, embedder = pipe.unet.to(dev).train(), pipe.embedder.to(dev)
    params = list(unet.parameters()) + list(embedder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "embedder": embedder})).eval().requires_grad_(False)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(dev)
    start, ckpt_path = 0, out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
        unet.load_state_dict(ckpt["unet"]); embedder.load_state_dict(ckpt["embedder"])
        ema.load_state_dict(ckpt["ema"]); opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {start}")
    elif resume:
        print(f"no checkpoint in {out}; starting from scratch")
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16)
    log = open(out / "train_log.jsonl", "a")
    losses, t0 = [], time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train demo unet")
    for step in bar:
        idx = _batch_indices(seed, step, len(x_all), batch_size)
        g = torch.Generator().manual_seed(seed * 7_919 + step)
        x0, y = x_all[idx].to(dev), y_all[idx].clone()
        y[torch.rand(batch_size, generator=g) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:  # linear warm-up over the first 200 steps
            group["lr"] = lr * min(1.0, (step + 1) / 200)
        with torch.autocast(**autocast):
            pred = unet(xt, t, encoder_hidden_states=embedder(y.to(dev))).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            mean = sum(losses) / len(losses)
            bar.set_postfix(loss=f"{mean:.4f}")
            log.write(json.dumps({"step": step + 1, "loss": mean, "elapsed_s": round(time.time() - t0, 1)}) + "\n")
            log.flush()
            losses = []
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_atomic({"unet": unet.state_dict(), "embedder": embedder.state_dict(), "ema": ema.state_dict(),
                          "opt": opt.state_dict(), "step": step + 1}, ckpt_path)
    log.close()
    weights = {f"unet.{k}": v.half().contiguous() for k, v in ema["unet"].state_dict().items()}
    weights.update({f"embedder.{k}": v.half().contiguous() for k, v in ema["embedder"].state_dict().items()})
    save_file(weights, str(out / "unet.safetensors"))
    return out / "unet.safetensors"


def train_classifier(out: str | Path, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, device: str = "auto",
                     data_dir: str | None = None, seed: int = 0) -> tuple[Path, float]:
    """Train the Fashion-MNIST classifier; returns the weights file and its test accuracy.

    Example:
        >>> path, accuracy = train_classifier("runs/classifier", epochs=1)
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train", data_dir)
    x, y = torch.from_numpy(images).float().div(255).unsqueeze(1), torch.from_numpy(labels)
    model = Classifier().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="train classifier")
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations generalise better
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb.to(dev)), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    xt = torch.from_numpy(test_images).float().div(255).unsqueeze(1)
    with torch.no_grad():
        pred = torch.cat([model(xt[i:i + 1000].to(dev)).argmax(-1).cpu() for i in range(0, len(xt), 1000)])
    accuracy = (pred.numpy() == test_labels).mean().item()
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, str(out / "classifier.safetensors"))
    (out / "classifier.json").write_text(json.dumps({"test_accuracy": accuracy, "epochs": epochs}) + "\n")
    return out / "classifier.safetensors", accuracy
