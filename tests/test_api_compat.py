"""Code written against the 0.1 API keeps working for one release: old import paths and renamed or
re-positioned arguments still do what they did, each with a DeprecationWarning that names the new form."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

import flatlora_kernels as fk


def tiny_peft_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(7, 5)), LoraConfig(r=2, target_modules=["0"]))


@pytest.mark.parametrize("old, new, names", [
    ("flatlora_kernels.integration", "flatlora_kernels.controller", ["apply_flat_lora", "FlatLora"]),
    ("flatlora_kernels.integration", "flatlora_kernels.config", ["FlatLoraConfig", "schedule_factor"]),
    ("flatlora_kernels.trainer", "flatlora_kernels.callback", ["FlatLoraCallback"]),
])
def test_old_import_paths_warn_and_give_the_same_objects(old, new, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        old_module = importlib.import_module(old)
    new_module = importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name)


def test_readme_0_1_calls_run_unchanged():
    # the two forms of the 0.1 README's "Train with it" section, verbatim but for the model
    ctl = fk.apply_flat_lora(tiny_peft_model(), sigma=0.05, schedule="cosine", total_steps=10,
                             resample_every=1, seed=0, per_rank_noise=True)
    assert ctl.config == fk.FlatLoraConfig(sigma=0.05, total_steps=10)
    ctl = fk.apply_flat_lora(tiny_peft_model(), fk.FlatLoraConfig(sigma=0.05, total_steps=1000))
    assert ctl.total_steps == 1000
    assert fk.FlatLoraCallback(sigma=0.05).config.sigma == 0.05


def test_generate_noise_offset_keyword_is_renamed_noise_offset():
    with pytest.warns(DeprecationWarning, match="noise_offset="):
        old = fk.generate_noise(3, 4, 9, offset=(2, 5))
    torch.testing.assert_close(old, fk.generate_noise(3, 4, 9, noise_offset=(2, 5)), rtol=0, atol=0)
    torch.testing.assert_close(old, fk.generate_noise(3, 6, 14)[2:, 5:], rtol=0, atol=0)
    with pytest.raises(TypeError, match="both offset= .* and noise_offset="):
        fk.generate_noise(3, 4, 9, offset=(2, 5), noise_offset=(1, 1))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['ofset'\\]"):
        fk.generate_noise(3, 4, 9, ofset=(2, 5))


def test_sam_flags_by_position_are_deprecated_keywords():
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    with pytest.warns(DeprecationWarning, match="adaptive, per_tensor by position"):
        sam = fk.SAM(params, torch.optim.SGD, 0.05, True, True, lr=0.1)
    assert (sam.perturber.adaptive, sam.perturber.per_tensor) == (True, True)
    assert not fk.SAM(params, torch.optim.SGD, 0.05, lr=0.1).perturber.adaptive
    with pytest.raises(TypeError, match="at most 3 positional"):
        fk.SAM(params, torch.optim.SGD, 0.05, True, True, "raise", 1)


@pytest.mark.parametrize("make", [
    lambda cfg: fk.apply_flat_lora(tiny_peft_model(), cfg, sigma=0.1),
    lambda cfg: fk.FlatLoraCallback(cfg, sigma=0.1),
    lambda cfg: fk.RWP(tiny_peft_model(), cfg, sigma=0.1),
], ids=["apply_flat_lora", "FlatLoraCallback", "RWP"])
def test_every_entry_point_refuses_a_config_and_fields_together(make):
    with pytest.raises(TypeError, match="not both .*'sigma'"):
        make(fk.FlatLoraConfig(total_steps=5))


def test_a_config_of_another_type_is_named():
    with pytest.raises(TypeError, match="config must be a FlatLoraConfig, got dict"):
        fk.apply_flat_lora(tiny_peft_model(), {"sigma": 0.1})


def test_public_names_are_all_exported():
    for name in fk.__all__:
        assert getattr(fk, name) is not None
    assert "flatness" in fk.__all__
