"""apply_flat_lora on real model families, and everything a LoRA run must keep working."""

import copy
import json

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

import flatlora_kernels as fk
from flatlora_kernels import FlatLoraLinear, apply_flat_lora, register_flat_lora
from flatlora_kernels.config import schedule_factor
from flatlora_kernels.noise import layer_seed

from .helpers import FAMILIES, gpt2, llama, peft_family


def lora_grads(model):
    """Gradients of the trainable parameters that got one (a pooler unused by the loss gets none)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def add_noise_in_place(model, ctl):
    """What the public code does: add c·Z into each frozen weight (the oracle here)."""
    with torch.no_grad():
        for name, layer in ctl.layers.items():
            target = model.get_submodule(name).base_layer.weight
            m, n = layer.logical_weight().shape
            eps = layer.noise_row_std[:, None] * fk.generate_noise(layer.noise_seed, m, n)
            target += eps.t() if layer.fan_in_fan_out else eps


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flat_lora_model_equals_materialised_perturbation(family):
    model, loss_fn = peft_family(family)
    materialised = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ctl = apply_flat_lora(model, sigma=0.2, schedule="constant", seed=5)
    expected_layers = [n for n, m in materialised.named_modules() if type(m) is LoraLinear]
    assert list(ctl.layers) == expected_layers and all(type(m) is FlatLoraLinear for m in ctl.layers.values())
    add_noise_in_place(materialised, ctl)
    model.train()
    materialised.train()
    torch.manual_seed(1)
    loss = loss_fn(model)
    loss.backward()
    torch.manual_seed(1)
    loss_ref = loss_fn(materialised)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    grads, grads_ref = lora_grads(model), lora_grads(materialised)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)
    # the noise matters (else this test could not fail) and W never moved
    ctl.clear()
    torch.manual_seed(1)
    assert abs(loss_fn(model).item() - loss.item()) > 1e-4
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_save_pretrained_is_plain_peft_and_merge_has_no_noise(tmp_path):
    model, loss_fn = peft_family("llama")
    plain = copy.deepcopy(model)
    ctl = apply_flat_lora(model, sigma=0.3, schedule="constant")
    loss_fn(model).backward()  # exercise the noisy path before saving
    model.save_pretrained(tmp_path / "flat")
    plain.save_pretrained(tmp_path / "plain")
    files = sorted(p.name for p in (tmp_path / "flat").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "plain").iterdir())
    flat_sd = safetensors.torch.load_file(tmp_path / "flat" / "adapter_model.safetensors")
    plain_sd = safetensors.torch.load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in flat_sd.items()} == {k: v.shape for k, v in plain_sd.items()}
    assert all(torch.equal(flat_sd[k], plain_sd[k]) for k in flat_sd)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("flat", "plain")]
    for config in configs:  # PEFT writes target_modules from a set: its order varies between saves
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]

    # plain PEFT loads it; apply_flat_lora works on the loaded model too
    base, _ = peft_family("llama")
    loaded = PeftModel.from_pretrained(base.unload(), tmp_path / "flat", is_trainable=True)
    ctl2 = apply_flat_lora(loaded, sigma=0.3, schedule="constant")
    assert len(ctl2.layers) == len(ctl.layers)

    merged = model.merge_and_unload()
    merged_plain = plain.merge_and_unload()
    for (n, p), (_, q) in zip(merged.named_parameters(), merged_plain.named_parameters()):
        assert torch.equal(p, q), n


def test_get_peft_model_with_registration_creates_flat_layers():
    torch.manual_seed(0)
    model, targets, _, loss_fn = llama()
    config = register_flat_lora(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model = get_peft_model(model, config)
    flat = [m for m in peft_model.modules() if isinstance(m, FlatLoraLinear)]
    assert len(flat) == 14 and not any(type(m) is LoraLinear for m in peft_model.modules())
    ctl = apply_flat_lora(peft_model, sigma=0.1, schedule="constant")
    assert len(ctl.layers) == 14
    loss_fn(peft_model).backward()


def test_gpt2_registration_needs_fan_in_fan_out():
    model, targets, _, _ = gpt2()
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        get_peft_model(model, register_flat_lora(LoraConfig(r=2, target_modules=targets)))


def test_apply_twice_or_without_lora_is_an_error():
    model, _ = peft_family("vit")
    apply_flat_lora(model, sigma=0.1, schedule="constant")
    with pytest.raises(ValueError, match="already called"):
        apply_flat_lora(model, sigma=0.1, schedule="constant")
    with pytest.raises(ValueError, match="no PEFT LoRA layers: wrap it with peft.get_peft_model"):
        apply_flat_lora(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma=-0.1), ValueError, "sigma"),
    (dict(sigma=float("nan")), ValueError, "sigma"),
    (dict(schedule="cosine"), ValueError, "total_steps"),
    (dict(schedule="exp", total_steps=5), ValueError, "schedule"),
    (dict(total_steps=0), ValueError, "total_steps"),
    (dict(total_steps=5, resample_every=0), ValueError, "resample_every"),
    (dict(total_steps=5, seed=-1), ValueError, "seed"),
    (dict(total_steps=5, per_rank_noise="yes"), TypeError, "per_rank_noise"),
])
def test_bad_arguments(kwargs, error, match):
    model, _ = peft_family("vit")
    with pytest.raises(error, match=match):
        apply_flat_lora(model, **kwargs)


def test_schedules():
    assert schedule_factor("cosine", 0, 10) == 0.0
    assert schedule_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 10, 10) == pytest.approx(1.0)
    assert schedule_factor("cosine", 15, 10) == pytest.approx(1.0)
    assert schedule_factor("linear", 3, 12) == pytest.approx(0.25)
    assert schedule_factor("constant", 3, None) == 1.0
    assert schedule_factor(lambda t, total: 0.1 * t, 3, None) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule callable"):
        schedule_factor(lambda t, total: -1.0, 3, None)


def test_controller_resamples_and_follows_the_schedule():
    model, _ = peft_family("vit")
    ctl = apply_flat_lora(model, sigma=0.1, schedule="cosine", total_steps=8, resample_every=2, seed=3)
    layer = next(iter(ctl.layers.values()))
    assert ctl.sigma_t == 0.0 and not layer.noise_active  # cosine starts at zero: plain LoRA
    seeds, sigmas = [], []
    for _ in range(8):
        ctl.step()
        seeds.append(layer.noise_seed)
        sigmas.append(ctl.sigma_t)
    # a new sample (and seed) at steps 2, 4, 6, 8; the same one in between
    assert [s == seeds[i - 1] for i, s in enumerate(seeds) if i] == [False, True, False, True, False, True, False]
    assert sigmas == pytest.approx([0.1 * schedule_factor("cosine", 2 * ((i + 1) // 2), 8) for i in range(8)])
    seeds_per_layer = {layer_seed(3, 1, k, 1) for k in range(len(ctl.layers))}
    assert len(seeds_per_layer) == len(ctl.layers)


def test_two_identical_runs_give_identical_adapters_and_leave_torch_rng_alone():
    def run():
        model, loss_fn = peft_family("llama")
        ctl = apply_flat_lora(model, sigma=0.1, total_steps=4, seed=11)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(4):
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad()
            ctl.step()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a = run()
    model, _ = peft_family("vit")
    state_before = torch.get_rng_state()
    ctl = apply_flat_lora(model, sigma=0.1, schedule="constant")
    ctl.step()
    assert torch.equal(torch.get_rng_state(), state_before), "Flat-LoRA touched the global torch RNG"
    b = run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_window_sees_one_sample():
    model, loss_fn = peft_family("llama")
    ctl = apply_flat_lora(model, sigma=0.2, schedule="constant")
    layer = next(iter(ctl.layers.values()))
    seen = []
    layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.noise_seed))
    for _ in range(3):  # three optimizer steps of four micro-batches
        for _ in range(4):
            loss_fn(model).backward()
        ctl.step()
    assert [len(set(seen[i:i + 4])) for i in range(0, 12, 4)] == [1, 1, 1]
    assert len(set(seen)) == 3


def test_gradient_checkpointing_regenerates_the_same_noise():
    grads = []
    for checkpointing in (False, True):
        model, loss_fn = peft_family("llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        apply_flat_lora(model, sigma=0.3, schedule="constant", seed=4)
        model.train()
        loss_fn(model).backward()
        grads.append(lora_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step(dtype):
    model, loss_fn = peft_family("llama")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    apply_flat_lora(model, sigma=0.1, schedule="constant")
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in lora_grads(model).values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_torch_compile_without_graph_breaks():
    model, _ = peft_family("vit")
    apply_flat_lora(model, sigma=0.2, schedule="constant")
    pixels = torch.randn(2, 3, 24, 24)
    layer = model.base_model.model.vit.layers[0].attention.q_proj
    x = torch.randn(3, 5, 48)
    eager = layer(x)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    out = torch.compile(model, backend="aot_eager")(pixel_values=pixels).logits
    torch.manual_seed(0)
    torch.testing.assert_close(out, model(pixel_values=pixels).logits, rtol=1e-5, atol=1e-6)


def test_config_object_and_keywords_are_the_same_procedure():
    config = fk.FlatLoraConfig(sigma=0.1, schedule="linear", total_steps=6, resample_every=2, seed=9)
    by_config = apply_flat_lora(peft_family("vit")[0], config)
    by_keywords = apply_flat_lora(peft_family("vit")[0], sigma=0.1, schedule="linear", total_steps=6,
                                  resample_every=2, seed=9)
    assert by_config.config == by_keywords.config == config
    assert by_config.state_dict() == by_keywords.state_dict()
    assert {k: by_config.state_dict()[k] for k in config.to_dict()} == config.to_dict()
    with pytest.raises(TypeError, match="not both"):
        apply_flat_lora(peft_family("vit")[0], config, sigma=0.2)
    with pytest.raises(TypeError, match="FlatLoraConfig"):
        apply_flat_lora(peft_family("vit")[0], {"sigma": 0.1})


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma=float("inf")), ValueError, "sigma"),
    (dict(sigma=True), ValueError, "sigma"),
    (dict(total_steps=2.5), ValueError, "total_steps"),
    (dict(resample_every=-1), ValueError, "resample_every"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(schedule=None), ValueError, "schedule"),
])
def test_config_is_validated_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        fk.FlatLoraConfig(**kwargs)
    with pytest.raises(error, match=match):  # the callback validates before any training starts
        fk.FlatLoraCallback(**kwargs)


def _mixed_lora_model(kind):
    """A dense LoRA Linear Flat-LoRA adopts, beside one LoRA layer of ``kind`` that it cannot drive."""
    from peft.tuners import lora

    def wrap(cls, base, **options):
        base.requires_grad_(False)  # frozen, as get_peft_model leaves it
        return cls(base, "default", config=LoraConfig(r=2, lora_alpha=4, **options), r=2, lora_alpha=4, **options)

    model = torch.nn.Module()
    model.dense = wrap(lora.Linear, torch.nn.Linear(16, 12))
    if kind == "embedding":
        model.other = wrap(lora.Embedding, torch.nn.Embedding(10, 16))
    elif kind == "alora":  # a LoRA variant Flat-LoRA does not drive
        model.other = wrap(lora.Linear, torch.nn.Linear(16, 12), alora_invocation_tokens=[1, 2])
    elif kind == "subclass":
        class MyLoraLinear(lora.Linear):
            pass
        model.other = wrap(MyLoraLinear, torch.nn.Linear(16, 12))
    elif kind == "8bit":
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear8bitLt(16, 12, bias=False, has_fp16_weights=False).to("cpu")  # quantizes
        model.other = wrap(lora.bnb.Linear8bitLt, base)
    else:  # PEFT's plain LoRA Linear around a 4-bit layer (what it builds when not told the model is 4-bit)
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(16, 12, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        base.weight = bnb.nn.Params4bit(torch.randn(12, 16), requires_grad=False, quant_type="nf4")
        model.other = wrap(lora.Linear, base.to("cpu"))  # .to quantizes
    return model


@pytest.mark.parametrize("kind,reason", [
    ("embedding", "not a LoRA Linear"), ("8bit", "not a LoRA Linear"), ("4bit-as-linear", "torch.uint8"),
    ("alora", "ALoraLinearVariant variant"), ("subclass", "subclass"),
])
def test_lora_layers_that_would_train_without_noise_are_reported(kind, reason, caplog):
    model = _mixed_lora_model(kind)
    other_type = type(model.other).__qualname__
    with pytest.warns(UserWarning, match=rf"WITHOUT Flat-LoRA noise.*other \(.*{other_type}.*{reason}"):
        with caplog.at_level("INFO", logger="flatlora_kernels"):
            ctl = apply_flat_lora(model, sigma=0.1, schedule="constant")
    assert list(ctl.layers) == ["dense"] and list(ctl.skipped) == ["other"] and reason in ctl.skipped["other"]
    assert "skipped other" in repr(ctl) and other_type in repr(ctl)
    assert "adopted 1 LoRA layers and skipped 1" in caplog.text and "other" in caplog.text
    assert type(model.other).__qualname__ == other_type  # left as it was
    model.dense(torch.randn(3, 16)).sum().backward()  # the adopted layer trains with noise

    strict_model = _mixed_lora_model(kind)
    with pytest.raises(ValueError, match=rf"strict=True.*\n  other: .*{reason}"):
        apply_flat_lora(strict_model, sigma=0.1, schedule="constant", strict=True)
    assert type(strict_model.dense) is LoraLinear  # nothing was changed before the error


def test_a_model_with_only_unsupported_lora_layers_names_them():
    model = _mixed_lora_model("embedding")
    del model.dense
    with pytest.raises(ValueError, match=r"none of the model's 1 LoRA layers can be trained with Flat-LoRA noise:\n"
                                         r"  skipped other: .*Embedding: not a LoRA Linear layer"):
        apply_flat_lora(model, sigma=0.1, schedule="constant")
