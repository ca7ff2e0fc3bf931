"""``tiec analyze``: per-step relative changes of the encoder features and the decoder output, checked against
forward hooks of the test's own, the model left untouched, the files written and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tiec.demo
from tiec.analyze import decoder_levels, encoder_levels, feature_dynamics, write_dynamics
from tiec.cli import main
from tiec.demo.model import DEFAULT_GUIDANCE
from tiec.flops import decoder_share

from conftest import make_demo_pipe, make_pipe, module_attributes, pipe_inputs, run

STEPS = 5
SD_LEVELS = ["conv_in", "down0.res0", "down0.res1", "down0.downsample", "down1.res0", "down1.res1", "mid"]
DEMO_LEVELS = ["conv_in", "down0.res0", "down0.res1", "down0.downsample", "down1.res0", "down1.res1",
               "down1.downsample", "down2.res0", "down2.res1", "down2.downsample", "down3.res0", "down3.res1", "mid"]


def analyse(pipe, kind: str = "sd", steps: int = STEPS, **extra):
    inputs = pipe_inputs(kind, steps=steps, **extra)
    inputs.pop("num_inference_steps")
    return feature_dynamics(pipe, None, num_steps=steps, **inputs)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((b - a).double()) / torch.linalg.vector_norm(a.double()))


def hook_counts(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in model.modules()
               for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                            "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"))


@pytest.fixture(scope="module")
def sd_result():
    pipe = make_pipe("sd")
    before = module_attributes(pipe.unet)
    result = analyse(pipe)
    return pipe, before, result


def test_one_row_per_step_with_the_loop_timesteps(sd_result):
    pipe, _, result = sd_result
    assert result["unet_calls"] == STEPS and len(result["steps"]) == STEPS
    assert [row["step"] for row in result["steps"]] == list(range(STEPS))
    assert [row["timestep"] for row in result["steps"]] == [float(t) for t in pipe.scheduler.timesteps]
    assert result["pipeline"] == "StableDiffusionPipeline" and result["model"] == "UNet2DConditionModel"
    assert result["scheduler"] == "DDIMScheduler" and result["num_inference_steps"] == STEPS
    assert result["batch"] == 2  # one image, guided


def test_level_names_follow_the_unet_layout(sd_result):
    _, _, result = sd_result
    assert result["encoder_levels"] == SD_LEVELS == encoder_levels(make_pipe("sd").unet)
    assert result["decoder_levels"] == ["up0", "up1", "output"]
    for row in result["steps"]:
        assert list(row["encoder"]) == SD_LEVELS and list(row["decoder"]) == ["up0", "up1", "output"]


def test_changes_are_finite_and_non_negative_after_the_first_step(sd_result):
    _, _, result = sd_result
    first, *rest = result["steps"]
    assert all(v is None for v in [*first["encoder"].values(), *first["decoder"].values()])
    for row in rest:
        for value in [*row["encoder"].values(), *row["decoder"].values()]:
            assert isinstance(value, float) and math.isfinite(value) and value >= 0
    assert any(v > 0 for row in rest for v in row["encoder"].values())


def test_values_match_an_independent_forward_hook():
    pipe = make_pipe("sd")
    seen: dict[str, list[torch.Tensor]] = {"conv_in": [], "down0.res1": [], "mid": [], "up1": [], "output": []}
    hooks = [pipe.unet.conv_in.register_forward_hook(lambda m, a, out: seen["conv_in"].append(out.clone())),
             pipe.unet.down_blocks[0].register_forward_hook(
                 lambda m, a, out: seen["down0.res1"].append(out[1][1].clone())),
             pipe.unet.mid_block.register_forward_hook(lambda m, a, out: seen["mid"].append(out.clone())),
             pipe.unet.up_blocks[1].register_forward_hook(lambda m, a, out: seen["up1"].append(out.clone())),
             pipe.unet.register_forward_hook(lambda m, a, out: seen["output"].append(out[0].clone()))]
    try:
        run(pipe, "sd", steps=STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    result = analyse(make_pipe("sd"))
    for step in (1, STEPS - 1):
        row = result["steps"][step]
        for name, tensors in seen.items():
            expected = relative_change(tensors[step - 1], tensors[step])
            got = row["encoder"][name] if name in row["encoder"] else row["decoder"][name]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), (step, name)


def test_encoder_flops_share_is_that_of_one_unet_call(sd_result):
    pipe, _, result = sd_result
    # FLOPs depend on the shapes only: the first call's shapes (guided batch 2, 16x16 latents, 7 text tokens)
    expected = 1 - decoder_share(pipe.unet, torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32))
    assert result["encoder_flops_share"] == pytest.approx(expected, rel=1e-12)
    assert 0 < result["encoder_flops_share"] < 1


def test_summary_is_the_mean_of_the_rows(sd_result):
    _, _, result = sd_result
    rows, summary = result["steps"][1:], result["summary"]
    encoder = [v for row in rows for v in row["encoder"].values()]
    output = [row["decoder"]["output"] for row in rows]
    assert summary["encoder_mean"] == pytest.approx(sum(encoder) / len(encoder))
    assert summary["output_mean"] == pytest.approx(sum(output) / len(output))
    assert summary["encoder_level_mean"]["mid"] == pytest.approx(sum(r["encoder"]["mid"] for r in rows) / len(rows))
    assert summary["steps_compared"] == STEPS - 1
    expected = [r["step"] for r in rows if max(r["encoder"].values()) < r["decoder"]["output"]]
    assert summary["steps_every_encoder_level_below_output"] == expected


def test_the_model_is_left_exactly_as_before(sd_result):
    pipe, before, _ = sd_result
    assert module_attributes(pipe.unet) == before
    assert hook_counts(pipe.unet) == 0
    assert not any("forward" in vars(m) for m in pipe.unet.modules())
    fresh = make_pipe("sd")
    assert np.array_equal(run(pipe, "sd", steps=STEPS), run(fresh, "sd", steps=STEPS))


def test_nothing_stays_attached_when_the_run_fails():
    pipe = make_pipe("sd")
    before = module_attributes(pipe.unet)

    def stop(pipe, step, timestep, tensors):
        raise KeyboardInterrupt  # also what Ctrl-C does in the middle of the loop

    with pytest.raises(KeyboardInterrupt):
        analyse(pipe, callback_on_step_end=stop)
    assert hook_counts(pipe.unet) == 0 and module_attributes(pipe.unet) == before


def test_sdxl_conditioning_reaches_the_flops_count():
    result = analyse(make_pipe("sdxl"), "sdxl", steps=3)
    assert len(result["steps"]) == 3 and 0 < result["encoder_flops_share"] < 1
    assert result["encoder_levels"] == ["conv_in", "down0.res0", "down0.downsample", "down1.res0", "mid"]


def test_demo_architecture_with_prompts():
    pipe = make_demo_pipe()
    result = feature_dynamics(pipe, ["sneaker", "bag"], num_steps=4, seed=3)
    assert result["encoder_levels"] == DEMO_LEVELS and result["decoder_levels"] == decoder_levels(pipe.unet)
    assert result["prompts"] == ["sneaker", "bag"] and result["seed"] == 3 and result["batch"] == 4
    assert len(result["steps"]) == 4 and result["guidance_scale"] == DEFAULT_GUIDANCE
    # The run's own generator: the same seed gives the same numbers, another seed other ones
    again = feature_dynamics(pipe, ["sneaker", "bag"], num_steps=4, seed=3)
    other = feature_dynamics(pipe, ["sneaker", "bag"], num_steps=4, seed=4)
    assert again["steps"] == result["steps"] and other["steps"] != result["steps"]


def test_write_dynamics_rounds_to_five_digits_and_draws_the_curves(sd_result, tmp_path):
    _, _, result = sd_result
    json_path, png_path = write_dynamics(result, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["encoder_levels"] == SD_LEVELS and len(data["steps"]) == STEPS
    original = result["steps"][2]["encoder"]["down0.res1"]
    assert data["steps"][2]["encoder"]["down0.res1"] == float(f"{original:.5g}")
    assert data["summary"]["encoder_mean"] == float(f"{result['summary']['encoder_mean']:.5g}")
    assert data["steps"][0]["decoder"]["output"] is None
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 400
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dynamics.json", "dynamics.png"]  # no temp files


def test_cli_writes_both_files_for_the_demo(tmp_path, capsys):
    out = tmp_path / "analyze"
    assert main(["analyze", "--steps", "5", "--out", str(out), "--threads", "1"]) == 0
    data = json.loads((out / "dynamics.json").read_text())
    assert data["prompts"] == list(tiec.demo.CLASSES) and data["unet_calls"] == 5
    assert data["pipeline"] == "FashionPipeline" and 0 < data["encoder_flops_share"] < 1
    assert (out / "dynamics.png").stat().st_size > 0
    assert "dynamics.json" in capsys.readouterr().out


def test_cli_prompts_list_and_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tiec.demo, "load_pipeline", lambda device=None: make_demo_pipe())
    assert main(["analyze", "--steps", "2", "--prompts", "sneaker, bag", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "dynamics.json").read_text())["prompts"] == ["sneaker", "bag"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("coat\n\na photo of a dress\n")
    assert main(["analyze", "--steps", "2", "--prompts", str(prompts), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "dynamics.json").read_text())["prompts"] == ["coat", "a photo of a dress"]


@pytest.mark.parametrize("argv, needle", [
    (["--prompts", "sneaker,cat"], "names no known class"),
    (["--prompts", "missing.txt"], "no such file"),
    (["--steps", "0"], "--steps 0"),
    (["--threads", "0"], "--threads 0"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--model", "no/such/folder"], "is not a folder"),
])
def test_cli_errors_are_one_line_before_loading(argv, needle, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(tiec.demo, "load_pipeline", forbidden)
    assert main(["analyze", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tiec analyze: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_cli_folder_model_needs_prompts_and_out_must_be_a_folder(tmp_path, capsys):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert main(["analyze", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "--prompts is required" in capsys.readouterr().err
    taken = tmp_path / "file"
    taken.write_text("")
    assert main(["analyze", "--out", str(taken)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
