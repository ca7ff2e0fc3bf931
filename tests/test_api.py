"""``tiec.apply`` as a whole: all-or-nothing installs, accelerate offload in either order, the handle's life cycle."""

import functools

import numpy as np
import pytest
import torch
from conftest import make_pipe, module_attributes, run, tiny_unet

import tiec
from tiec._patch import call_observers, patch_owners
from tiec.deepcache import DeepCache
from tiec.propagation import EncoderPropagation
from tiec.tome import TokenMerging

FD = tiec.EncoderPropagationConfig
ToMe = tiec.TokenMergingConfig
PARTS = {"propagation": (EncoderPropagation, FD(key_steps="every:2")),
         "tome": (TokenMerging, ToMe(ratio=0.5)),
         "deepcache": (DeepCache, tiec.DeepCacheConfig(cache_interval=2))}


class Boom(Exception):
    """The failure the tests inject into an install."""


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("sd")


def fail_install(monkeypatch, cls, after_patches):
    """Make ``cls``'s install raise once it has made ``after_patches`` patches (None: once it has finished)."""
    if after_patches is None:
        original_install = cls.install

        def install(self):
            original_install(self)
            raise Boom("install failed after it finished")
        monkeypatch.setattr(cls, "install", install)
        return
    original_patch, made = cls.patch, []

    def patch(self, *args, **kwargs):
        if len(made) == after_patches:
            raise Boom(f"install failed after {after_patches} patches")
        made.append(args)
        return original_patch(self, *args, **kwargs)
    monkeypatch.setattr(cls, "patch", patch)


def snapshot(pipe):
    """What an apply may touch: the pipeline's class, every UNet module's attributes, the scheduler's attributes."""
    return type(pipe), call_observers(pipe), module_attributes(pipe.unet), sorted(pipe.scheduler.__dict__)


def no_tiec_left(model: torch.nn.Module) -> bool:
    return not any(patch_owners(m) for m in model.modules())


# -- defect 2: apply is all-or-nothing ------------------------------------------------------------------
@pytest.mark.parametrize("after_patches", [0, 3, None])
@pytest.mark.parametrize("name", list(PARTS))
def test_failed_install_leaves_the_pipeline_as_it_was(pipe, monkeypatch, name, after_patches):
    cls, config = PARTS[name]
    plain = run(pipe, "sd", steps=4)
    before = snapshot(pipe)
    fail_install(monkeypatch, cls, after_patches)
    with pytest.raises(Boom):
        tiec.apply(pipe, config)
    monkeypatch.undo()
    assert snapshot(pipe) == before and type(pipe) is before[0]
    assert not call_observers(pipe) and no_tiec_left(pipe.unet)
    assert np.array_equal(run(pipe, "sd", steps=4), plain)


@pytest.mark.parametrize("failing", ["first", "second"])
@pytest.mark.parametrize("pair", [("propagation", "tome"), ("deepcache", "tome")])
def test_failed_config_undoes_the_others_of_the_same_call(pipe, monkeypatch, pair, failing):
    plain = run(pipe, "sd", steps=4)
    before = snapshot(pipe)
    cls = PARTS[pair[0] if failing == "first" else pair[1]][0]
    fail_install(monkeypatch, cls, 2)
    with pytest.raises(Boom):
        tiec.apply(pipe, *(PARTS[n][1] for n in pair))
    monkeypatch.undo()
    assert snapshot(pipe) == before and no_tiec_left(pipe.unet)
    assert np.array_equal(run(pipe, "sd", steps=4), plain)


@pytest.mark.parametrize("name", list(PARTS))
def test_failed_replacement_keeps_the_earlier_part(pipe, monkeypatch, name):
    cls, config = PARTS[name]
    plain = run(pipe, "sd", steps=4)
    other = tiec.apply(pipe, ToMe(ratio=0.3)) if name != "tome" else None  # shares the pipeline class
    handle = tiec.apply(pipe, config)
    applied = run(pipe, "sd", steps=4)
    before = snapshot(pipe)
    fail_install(monkeypatch, cls, 2)
    with pytest.raises(Boom):
        tiec.apply(pipe, config)
    monkeypatch.undo()
    assert snapshot(pipe) == before and all(part.active for part in handle.parts)
    assert np.array_equal(run(pipe, "sd", steps=4), applied)
    handle.remove()
    if other is not None:
        other.remove()
    assert no_tiec_left(pipe.unet) and not call_observers(pipe)
    assert np.array_equal(run(pipe, "sd", steps=4), plain)


VARIANTS = {"propagation": FD(key_steps="every:3"), "tome": ToMe(ratio=0.2),
            "deepcache": tiec.DeepCacheConfig(cache_interval=3)}


@pytest.mark.parametrize("name", list(PARTS))
def test_replacement_acts_as_a_fresh_apply_and_removes_cleanly(pipe, name):
    config = PARTS[name][1]
    plain, before = run(pipe, "sd", steps=4), snapshot(pipe)
    with tiec.apply(pipe, config):
        want = run(pipe, "sd", steps=4)
    earlier = tiec.apply(pipe, VARIANTS[name])
    later = tiec.apply(pipe, config)  # installed first, then the earlier part is unlinked from beneath it
    assert not earlier.active and later.active
    assert np.array_equal(run(pipe, "sd", steps=4), want)
    applied = snapshot(pipe)
    earlier.remove()  # removes nothing: it was replaced
    assert snapshot(pipe) == applied
    later.remove()
    assert snapshot(pipe) == before
    assert np.array_equal(run(pipe, "sd", steps=4), plain)


def test_failed_install_on_a_bare_unet(monkeypatch):
    unet = tiny_unet()
    before = module_attributes(unet)
    fail_install(monkeypatch, TokenMerging, 4)
    with pytest.raises(Boom):
        tiec.apply(unet, ToMe())
    assert module_attributes(unet) == before


# -- defect 19: a removed handle cannot be entered --------------------------------------------------------
def test_entering_a_removed_handle_raises(pipe):
    handle = tiec.apply(pipe, ToMe())
    handle.remove()
    handle.remove()  # removing twice stays harmless
    with pytest.raises(RuntimeError, match="removed"):
        with handle:
            pass
    replaced = tiec.apply(pipe, ToMe())
    with tiec.apply(pipe, ToMe(ratio=0.3)):
        with pytest.raises(RuntimeError, match="removed"):
            replaced.__enter__()
    assert no_tiec_left(pipe.unet)


# -- defect 11: accelerate's CPU offload, before or after apply ----------------------------------------
OFFLOAD_CONFIGS = [FD(key_steps="all"), FD(key_steps="all", parallel=False),
                   FD(key_steps="every:3", estimator="extrapolate"), ToMe(), tiec.DeepCacheConfig(cache_interval=2)]


def offload(pipe, how: str) -> None:
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        # What pipe.enable_sequential_cpu_offload() does (weights on the meta device, loaded module by module).
        # The pipeline method itself fails on a CPU-only machine with accelerate 1.15 / torch 2.13, tiec or not:
        # it passes the device "cpu:0", for which accelerate rebuilds the weights as plain tensors.
        from accelerate import cpu_offload
        for model in pipe.components.values():
            if isinstance(model, torch.nn.Module):
                cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


def bound_forward(module: torch.nn.Module):
    return type(module).forward.__get__(module)


def hooked_attributes(model: torch.nn.Module) -> dict:
    """``module_attributes`` with accelerate's hook objects by kind: model offload makes new ones at every call."""
    out = module_attributes(model)
    for attrs in out.values():
        if "_hf_hook" in attrs:
            attrs["_hf_hook"] = type(attrs["_hf_hook"]).__name__
        forward = attrs.get("forward")
        if isinstance(forward, functools.partial) and forward.func.__module__.startswith("accelerate."):
            attrs["forward"] = "accelerate's wrapper"
    return out


def without_accelerate_leftovers(model: torch.nn.Module, attributes: dict) -> dict:
    """``attributes`` less the instance ``forward`` accelerate's remove_hook_from_module leaves (the class method)."""
    out = {}
    for name, module in model.named_modules():
        attrs = dict(attributes[name])
        if "forward" in attrs and attrs["forward"] == bound_forward(module):
            del attrs["forward"]
        out[name] = attrs
    return out


def counters(handle) -> dict:
    stats = dict(handle.stats)
    assert any(stats.values()), stats  # the method really ran
    return stats


@pytest.mark.parametrize("how", ["model", "sequential"])
def test_offload_then_apply(how):
    pytest.importorskip("accelerate")
    pipe = make_pipe("sd")
    plain = run(pipe, "sd", steps=6)
    expected = []
    for config in OFFLOAD_CONFIGS:
        with tiec.apply(pipe, config) as handle:
            expected.append((run(pipe, "sd", steps=6), counters(handle)))
    offload(pipe, how)
    assert np.array_equal(run(pipe, "sd", steps=6), plain)  # offloading on a CPU changes no number
    before = hooked_attributes(pipe.unet)
    for config, (want, stats) in zip(OFFLOAD_CONFIGS, expected):
        handle = tiec.apply(pipe, config)
        # model offload removes and re-adds its hooks after every call (and here once more by hand)
        for _ in range(2):
            assert np.array_equal(run(pipe, "sd", steps=6), want), config
            assert counters(handle) == stats
        if how == "model":
            pipe.enable_model_cpu_offload(device="cpu")
            assert np.array_equal(run(pipe, "sd", steps=6), want) and counters(handle) == stats
        if config.__class__ is FD and config.key_steps == "all":
            assert np.array_equal(want, plain)
        handle.remove()
        assert hooked_attributes(pipe.unet) == before, config
        assert np.array_equal(run(pipe, "sd", steps=6), plain)


@pytest.mark.parametrize("config", OFFLOAD_CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("how", ["model", "sequential"])
def test_apply_then_offload(how, config):
    pytest.importorskip("accelerate")
    pipe = make_pipe("sd")
    original = module_attributes(pipe.unet)
    plain = run(pipe, "sd", steps=6)
    handle = tiec.apply(pipe, config)
    want, stats = run(pipe, "sd", steps=6), counters(handle)
    offload(pipe, how)
    for _ in range(2):
        assert np.array_equal(run(pipe, "sd", steps=6), want)
        assert counters(handle) == stats
    handle.remove()
    assert no_tiec_left(pipe.unet)
    for module in pipe.unet.modules():
        if "_old_forward" in module.__dict__:  # what accelerate would have stored without tiec
            assert module._old_forward == bound_forward(module)
            assert module.forward.__wrapped__ == bound_forward(module)
            assert "__tiec_patch__" not in module.forward.__dict__
    assert np.array_equal(run(pipe, "sd", steps=6), plain)
    pipe.remove_all_hooks()
    assert without_accelerate_leftovers(pipe.unet, module_attributes(pipe.unet)) == original


def test_a_patch_replaced_by_other_code_is_reported_at_the_next_call(pipe):
    plain = run(pipe, "sd", steps=4)
    handle = tiec.apply(pipe, ToMe())
    pipe.unet.forward = bound_forward(pipe.unet)  # other code drops tiec's patch
    with pytest.raises(RuntimeError, match="replaced"):
        run(pipe, "sd", steps=4)
    handle.remove()
    del pipe.unet.forward
    assert no_tiec_left(pipe.unet) and not call_observers(pipe)
    assert np.array_equal(run(pipe, "sd", steps=4), plain)


def test_remove_refuses_a_patch_wrapped_by_unknown_code(pipe):
    from diffusers.hooks import HookRegistry, ModelHook
    plain = run(pipe, "sd", steps=4)
    handle = tiec.apply(pipe, ToMe())
    merged = run(pipe, "sd", steps=4)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)
    registry.register_hook(ModelHook(), "probe")
    state = module_attributes(pipe.unet)
    with pytest.raises(RuntimeError, match="wrapped"):
        handle.remove()
    with pytest.raises(RuntimeError, match="wrapped"):
        tiec.apply(pipe, ToMe(ratio=0.3))  # replacing the buried part is refused the same way, before any change
    assert module_attributes(pipe.unet) == state and all(part.active for part in handle.parts)
    assert np.array_equal(run(pipe, "sd", steps=4), merged)
    registry.remove_hook("probe")
    handle.remove()
    del pipe.unet._diffusers_hook
    assert no_tiec_left(pipe.unet) and not call_observers(pipe)
    assert np.array_equal(run(pipe, "sd", steps=4), plain)
