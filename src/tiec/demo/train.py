"""Training of the demo UNet and classifier: fixed seed, progress bar, periodic checkpoints, resume."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_fashion_mnist
from .model import CONFIG_FILE, NULL_CLASS, SCHEDULER_CONFIG, UNET_CONFIG, Classifier, build_pipeline, pad_images

LABEL_DROPOUT = 0.1  # share of training examples shown with the null prompt, for classifier-free guidance
TIMESTEP_BUCKETS = 10  # the training log reports the loss per tenth of the timestep range
# Settings a resumed run must share with its checkpoint: changing them mid-run silently trains another recipe.
RECIPE_KEYS = ("batch_size", "lr", "seed", "ema_decay", "model")


def pick_device(device: str = "auto") -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' as a torch device; ValueError for anything else or a missing GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}; use 'auto', 'cpu' or 'cuda'")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch build sees no CUDA GPU; use 'cpu' or 'auto'")
    return torch.device(device)


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file, so that a crash never leaves a half-written `path` (nor the temp)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A training checkpoint; ValueError naming the file when it is truncated or not one of ours."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ckpt, dict) or not {"unet", "embedder", "ema", "opt", "step"} <= ckpt.keys():
        raise ValueError(f"checkpoint {path} is not a tiec demo training checkpoint; delete it to start over")
    return ckpt


def _batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    # Derived from (seed, step) alone, so a resumed run sees the same batches as an uninterrupted one.
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=g)


def export_weights(ema: torch.nn.ModuleDict, config: dict, path: Path, **info) -> Path:
    """Write the EMA weights (fp16 safetensors) and the config.json that `load_pipeline` reads beside them."""
    from safetensors.torch import save_file

    weights = {f"unet.{k}": v.half().contiguous() for k, v in ema["unet"].state_dict().items()}
    weights.update({f"embedder.{k}": v.half().contiguous() for k, v in ema["embedder"].state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    (path.parent / CONFIG_FILE).write_text(json.dumps({**config, "training": info}, indent=1) + "\n")
    return path


def learning_rate_factor(step: int, steps: int, cooldown: int = 0, warmup: int = 200) -> float:
    """The multiplier of the learning rate at ``step`` (0-based): a linear warm-up over ``warmup`` steps times a
    linear fall over the last ``cooldown`` steps (to 1 / cooldown at the last step).

    Example:
        >>> [learning_rate_factor(s, 1000, cooldown=400) for s in (0, 199, 500, 600, 800, 999)]
        [0.005, 1.0, 1.0, 1.0, 0.5, 0.0025]
    """
    factor = min(1.0, (step + 1) / warmup)
    if cooldown:
        factor *= min(1.0, (steps - step) / cooldown)
    return factor


def train_unet(out: str | Path, steps: int = 20000, batch_size: int = 64, lr: float = 5e-4, device: str = "auto",
               data_dir: str | None = None, resume: bool = False, seed: int = 0, ema_decay: float = 0.999,
               checkpoint_every: int = 100, snapshot_every: int = 1000, log_every: int = 50,
               cooldown: int = 0) -> Path:
    """Train the demo UNet (v-prediction, label dropout for guidance, EMA); returns the exported weights file.

    The learning rate warms up over 200 steps, stays at ``lr``, and with ``cooldown`` > 0 falls linearly to zero
    over the last ``cooldown`` steps before ``steps`` (a warm-up, stable, decay schedule: a run at constant rate
    can be resumed with the ``steps`` where it should end and a cooldown, once its curve says where to stop).

    Writes OUT/checkpoint.pt every `checkpoint_every` steps and on Ctrl-C, the EMA weights every `snapshot_every`
    steps (OUT/snapshots/STEP/, for quality-against-steps curves), and OUT/unet.safetensors + config.json at the end.
    A folder that holds a checkpoint is continued only with `resume=True`, and only with the same recipe.

    Example:
        >>> train_unet("runs/demo", steps=200)  # doctest: +SKIP
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("snapshot_every", snapshot_every), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not isinstance(cooldown, int) or not 0 <= cooldown <= steps:
        raise ValueError(f"cooldown={cooldown!r} must be an integer between 0 and steps={steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive number")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; give a folder")
    dev = pick_device(device)
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, dev) if ckpt_path.exists() else None
    if ckpt is not None and not resume:
        raise ValueError(f"{ckpt_path} holds a run at step {ckpt['step']}; pass --resume to continue it, "
                         f"or choose another --out")
    config = {"unet": UNET_CONFIG, "scheduler": SCHEDULER_CONFIG}
    recipe = {"batch_size": batch_size, "lr": lr, "seed": seed, "ema_decay": ema_decay,
              "model": json.loads(json.dumps(config))}
    if ckpt is not None:
        changed = [f"{k}: checkpoint {ckpt['recipe'].get(k)!r}, now {recipe[k]!r}" for k in RECIPE_KEYS
                   if k in ckpt.get("recipe", {}) and ckpt["recipe"][k] != recipe[k] and k != "model"]
        if ckpt.get("recipe", {}).get("model", recipe["model"]) != recipe["model"]:
            changed.append("the model configuration")
        if changed:
            raise ValueError(f"--resume with another recipe than {ckpt_path} ({'; '.join(changed)}); "
                             f"use the checkpoint's settings or another --out")
        if ckpt["step"] >= steps:
            raise ValueError(f"{ckpt_path} is already at step {ckpt['step']} >= steps={steps}; ask for more steps")
    images, labels = load_fashion_mnist("train", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_all, y_all = pad_images(torch.from_numpy(images)), torch.from_numpy(labels)
    pipe = build_pipeline(seed)
    unet, embedder = pipe.unet.to(dev).train(), pipe.embedder.to(dev)
    params = list(unet.parameters()) + list(embedder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "embedder": embedder})).eval().requires_grad_(False)
    scheduler = pipe.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.to(dev)
    start = 0
    if ckpt is not None:
        unet.load_state_dict(ckpt["unet"]); embedder.load_state_dict(ckpt["embedder"])
        ema.load_state_dict(ckpt["ema"]); opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {start}")
    del ckpt
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16)
    num_t = len(alphas_cumprod)

    def checkpoint(step: int) -> None:
        save_atomic({"unet": unet.state_dict(), "embedder": embedder.state_dict(), "ema": ema.state_dict(),
                     "opt": opt.state_dict(), "step": step, "recipe": recipe}, ckpt_path)

    log = open(out / "train_log.jsonl", "a")
    losses, bucket_sum, bucket_n, t0 = [], torch.zeros(TIMESTEP_BUCKETS), torch.zeros(TIMESTEP_BUCKETS), time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train demo unet")
    step = start
    try:
        for step in bar:
            idx = _batch_indices(seed, step, len(x_all), batch_size)
            g = torch.Generator().manual_seed(seed * 7_919 + step)
            x0, y = x_all[idx].to(dev), y_all[idx].clone()
            y[torch.rand(batch_size, generator=g) < LABEL_DROPOUT] = NULL_CLASS
            t = torch.randint(0, num_t, (batch_size,), generator=g).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise if scheduler.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            for group in opt.param_groups:
                group["lr"] = lr * learning_rate_factor(step, steps, cooldown)
            with torch.autocast(**autocast):
                pred = unet(xt, t, encoder_hidden_states=embedder(y.to(dev))).sample
            per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), params):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            buckets = (t * TIMESTEP_BUCKETS // num_t).cpu()
            bucket_sum.index_add_(0, buckets, per_sample.detach().cpu())
            bucket_n.index_add_(0, buckets, torch.ones(batch_size))
            if (step + 1) % log_every == 0:
                mean = sum(losses) / len(losses)
                bar.set_postfix(loss=f"{mean:.4f}")
                by_t = (bucket_sum / bucket_n.clamp(min=1)).tolist()
                log.write(json.dumps({"step": step + 1, "loss": mean, "loss_by_t": [round(v, 5) for v in by_t],
                                      "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                log.flush()
                losses, bucket_sum, bucket_n = [], torch.zeros(TIMESTEP_BUCKETS), torch.zeros(TIMESTEP_BUCKETS)
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                checkpoint(step + 1)
            if (step + 1) % snapshot_every == 0:
                export_weights(ema, config, out / "snapshots" / f"{step + 1:06d}" / "unet.safetensors", step=step + 1)
    except KeyboardInterrupt:
        done = step - start  # the interrupted step did not finish its update for sure: keep the last whole one
        if done > 0:
            checkpoint(step)
            print(f"\ninterrupted: checkpoint at step {step} in {ckpt_path}; continue with --resume")
        raise
    finally:
        log.close()
    return export_weights(ema, config, out / "unet.safetensors", step=steps, batch_size=batch_size, lr=lr,
                          ema_decay=ema_decay, seed=seed, cooldown=cooldown)


def train_classifier(out: str | Path, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, device: str = "auto",
                     data_dir: str | None = None, seed: int = 0) -> tuple[Path, float]:
    """Train the Fashion-MNIST classifier; returns the weights file and its test accuracy.

    Example:
        >>> path, accuracy = train_classifier("runs/classifier", epochs=1)  # doctest: +SKIP
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
