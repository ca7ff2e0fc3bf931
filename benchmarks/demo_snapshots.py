"""Quality of demo weights folders side by side (e.g. training snapshots against the shipped release).

For each folder ("shipped" = the weights in the package): N DDIM-50 samples (classes cycled, seeds 0..N-1,
guidance 3), their FID against a fixed 500-image subset of the Fashion-MNIST test set (biased upward by the
small sizes: compare folders with each other only), classifier adherence and frame speckle.

    python benchmarks/demo_snapshots.py THREADS N shipped RUN/snapshots/001000 ...
"""
import sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from tiec.demo.model import load_pipeline, CLASSES
from tiec.demo import classify
from tiec.eval.fid import InceptionFeatures, fashion_mnist_reference
from tiec.eval.metrics import frechet_distance_to_features, frame_speckle
n = int(sys.argv[2])
net = InceptionFeatures()
(mu, sigma), what = fashion_mnist_reference(net, 500)
print(what, flush=True)
for wd in sys.argv[3:]:
    t0 = time.time()
    pipe = load_pipeline(weights_dir=None if wd == "shipped" else wd)
    prompts = [CLASSES[i % 10] for i in range(n)]
    images, samples = [], []
    for start in range(0, n, 50):
        cap = []
        def cb(p, i, t, kw):
            if i == 49: cap.append(kw["latents"].clone())
            return kw
        with torch.no_grad():
            out = pipe(prompts[start:start + 50], num_inference_steps=50, output_type="np",
                       generator=[torch.Generator().manual_seed(s) for s in range(start, min(n, start + 50))],
                       callback_on_step_end=cb)
        images.append(out.images); samples.append(((cap[0].float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy())
    images = np.concatenate(images); samples = np.concatenate(samples)
    u8 = (images[..., 0] * 255).round().astype(np.uint8)
    fid = frechet_distance_to_features(net(u8), mu, sigma)
    acc = float((np.asarray(classify(images)) == np.array([i % 10 for i in range(n)])).mean())
    print(f"{wd}: FID({n}) {fid:.2f} adherence {acc:.3f} speckle {float(frame_speckle(samples).mean()):.4f} ({time.time()-t0:.0f} s)", flush=True)
