"""FlatLoraLinear inside real PEFT models: same state, same merges, noise only where asked."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers.pytorch_utils import Conv1D

from flatlora_kernels import FlatLoraLinear

from .helpers import TinyMLP, assert_close_rel, float64_flat_lora


def peft_model(dtype=torch.float32, **config):
    model = TinyMLP(29, 37, 11, bias=(True, False)).to(dtype)  # one layer with a bias, one without
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **config}
    return get_peft_model(model, LoraConfig(**config))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def to_flat(model):
    for layer in lora_layers(model):
        FlatLoraLinear.from_lora_linear(layer)
        with torch.no_grad():  # B starts at zero in PEFT; give it a value so the LoRA path matters
            layer.lora_B["default"].weight.normal_(std=0.1)
    return model


def test_state_dict_and_repr_match_peft():
    plain = peft_model()
    flat = to_flat(copy.deepcopy(plain))
    for layer in lora_layers(flat):
        layer.sample_noise(5, 0.1)
    assert {k: v.shape for k, v in flat.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(type(m) is FlatLoraLinear for m in lora_layers(flat))
    assert "flatlora.FlatLoraLinear(" in repr(flat)


def test_forward_is_the_functional_op_and_eval_is_plain_lora():
    model = to_flat(peft_model())
    layer = model.base_model.model.fc1
    x = torch.randn(6, 29)
    plain = layer(x)  # no sample yet: PEFT's forward
    layer.sample_noise(seed=123, sigma=0.2)
    assert layer.noise_active and layer.noise_seed == 123
    noisy = layer(x)
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected_std = 0.2 * torch.linalg.vector_norm(w.double() + 2.0 * b.double() @ a.double(), dim=1) / 29**0.5
    torch.testing.assert_close(layer.noise_row_std.double(), expected_std)
    y64, _ = float64_flat_lora(x, w, layer.base_layer.bias, a, b, 2.0, 123, layer.noise_row_std)
    assert_close_rel(noisy, y64, torch.float32, "noisy forward")
    assert (noisy - plain).abs().max() > 1e-2  # the noise is really there
    layer.eval()
    torch.testing.assert_close(layer(x), plain)
    layer.train()
    layer.sample_noise(seed=123, sigma=0.0)
    assert not layer.noise_active
    torch.testing.assert_close(layer(x), plain)


def test_weights_bitwise_unchanged_after_training_steps():
    model = to_flat(peft_model(torch.bfloat16))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(20):
        for index, layer in enumerate(lora_layers(model)):
            layer.sample_noise(seed=1000 * step + index, sigma=0.1)
        loss = model(torch.randn(8, 29, dtype=torch.bfloat16)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start)), "LoRA weights did not train"


def test_merge_and_unload_has_no_trace_of_noise():
    plain = peft_model()
    flat = to_flat(copy.deepcopy(plain))
    for p, q in zip(lora_layers(plain), lora_layers(flat)):
        p.lora_B["default"].weight.data.copy_(q.lora_B["default"].weight)
        q.sample_noise(seed=9, sigma=0.5)
    x = torch.randn(4, 29)
    flat.eval()
    plain.eval()
    torch.testing.assert_close(flat(x), plain(x))
    merged_flat = flat.merge_and_unload()
    merged_plain = plain.merge_and_unload()
    for (name, p), (_, q) in zip(merged_flat.named_parameters(), merged_plain.named_parameters()):
        assert torch.equal(p, q), name


def test_disabled_adapters_behave_as_peft_and_merged_ones_are_refused_in_training():
    model = to_flat(peft_model())
    layer = model.base_model.model.fc1
    layer.sample_noise(seed=1, sigma=0.3)
    x = torch.randn(3, 29)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.merge()
    # merged: a noisy training forward would add no noise (the LoRA path is skipped), so it is refused
    with pytest.raises(RuntimeError, match="merged adapters.*unmerge_adapter"):
        layer(x)
    with pytest.raises(RuntimeError, match="merged adapters"):
        layer.sample_noise(seed=2, sigma=0.3)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # in eval it is PEFT's: the base holds W + sBA
    layer.unmerge()


def test_gpt2_conv1d_indexes_the_logical_matrix():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(21, 34)  # nx=34 inputs, nf=21 outputs, weight stored (34, 21)

        def forward(self, x):
            return self.c_attn(x)

    model = get_peft_model(Conv(), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    layer = FlatLoraLinear.from_lora_linear(lora_layers(model)[0])
    layer.lora_B["default"].weight.data.normal_()
    layer.sample_noise(seed=77, sigma=0.2)
    assert layer.noise_row_std.shape == (21,)
    x = torch.randn(5, 34, requires_grad=True)
    y = model(x)
    w = layer.base_layer.weight.t()  # logical (out, in)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y64, leaves = float64_flat_lora(x, w, layer.base_layer.bias, a, b, 2.0, 77, layer.noise_row_std)
    assert_close_rel(y, y64, torch.float32, "Conv1D forward")
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx64,) = torch.autograd.grad(y64.sum(), leaves[0])
    assert_close_rel(gx, gx64, torch.float32, "Conv1D grad x")


def test_unsupported_configurations_raise():
    model = peft_model(alora_invocation_tokens=[1, 2])  # a LoRA variant Flat-LoRA does not drive
    layer = lora_layers(model)[0]
    FlatLoraLinear.from_lora_linear(layer)
    with pytest.raises(NotImplementedError, match="ALoraLinearVariant variant; Flat-LoRA noise supports vanilla"):
        layer.sample_noise(seed=0, sigma=0.1)

    model = to_flat(peft_model())
    model.add_adapter("second", LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    layer = model.base_model.model.fc1
    layer.sample_noise(seed=0, sigma=0.1)
    layer.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        layer(torch.randn(2, 29))
    layer.set_adapter("default")
    with pytest.raises(ValueError, match="mixed-adapter"):
        layer(torch.randn(2, 29), adapter_names=["default", "second"])

    with pytest.raises(ValueError, match="already a FlatLoraLinear"):
        FlatLoraLinear.from_lora_linear(layer)
    with pytest.raises(TypeError, match="peft.tuners.lora.Linear"):
        FlatLoraLinear.from_lora_linear(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sigma"):
        layer.sample_noise(seed=0, sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        layer.sample_noise(seed=0, sigma=float("nan"))
    with pytest.raises(TypeError, match="seed"):
        layer.sample_noise(seed="zero", sigma=0.1)


def test_lora_dropout_is_applied_with_noise():
    model = to_flat(peft_model(lora_dropout=0.5))
    layer = model.base_model.model.fc1
    layer.sample_noise(seed=4, sigma=0.1)
    x = torch.randn(64, 29)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b), "dropout masks should differ between draws"
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), a)


def test_layer_is_constructible_directly():
    base = torch.nn.Linear(10, 6)
    layer = FlatLoraLinear(base, "default", config=LoraConfig(r=2, lora_alpha=4), r=2, lora_alpha=4)
    layer.lora_B["default"].weight.data.normal_()
    layer.sample_noise(seed=3, sigma=0.1)
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="frozen"):  # get_peft_model would have frozen it
        layer(x)
    base.weight.requires_grad_(False)
    y64, _ = float64_flat_lora(x, base.weight, base.bias, layer.lora_A["default"].weight,
                               layer.lora_B["default"].weight, 2.0, 3, layer.noise_row_std)
    assert_close_rel(layer(x), y64, torch.float32, "direct layer")
