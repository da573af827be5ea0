"""Flat-LoRA on PEFT's LoRA variants (DoRA, AdaLoRA, lora_bias, LoRA-GA) and at the edges (merged
adapters, adapter switching, models it cannot drive), each against a float64 oracle."""

import pytest
import torch

import flatlora_kernels as fk

from .helpers import assert_close_rel, rel_err, trainable


@pytest.mark.parametrize("noise_offset", [(0, 0), (5, 3), (2, 12), (1, 16)])  # columns: 3, 4 and 0 mod 8
def test_perturbed_merged_row_norms_equal_float64(device_backend, noise_offset):
    device, _ = device_backend
    m, n, r = 37, 53, 3
    weight = torch.randn(m, n, device=device)
    lora_A, lora_B = torch.randn(r, n, device=device), torch.randn(m, r, device=device)
    row_std = torch.rand(m, device=device) * 0.7
    row_std[4] = 0.0
    norms = fk.merged_row_norms(weight, lora_A, lora_B, 0.37, seed=2**63 + 11, row_std=row_std,
                                noise_offset=noise_offset)
    r0, c0 = noise_offset
    z = fk.generate_noise(2**63 + 11, r0 + m, c0 + n)[r0:, c0:].double()
    expected = (weight.double().cpu() + row_std.double().cpu()[:, None] * z
                + 0.37 * lora_B.double().cpu() @ lora_A.double().cpu()).norm(dim=1)
    torch.testing.assert_close(norms.double().cpu(), expected, rtol=2e-6, atol=0)
    clean = fk.merged_row_norms(weight, lora_A, lora_B, 0.37)
    assert (norms - clean).abs().max() > 1e-2  # the noise is in there
    assert torch.equal(norms[4], clean[4])  # c_i = 0 leaves row i alone


def test_perturbed_merged_row_norms_check_their_arguments():
    weight, lora_A, lora_B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="row_std must be a float32 tensor of shape \\(6,\\)"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=1, row_std=torch.ones(5))
    with pytest.raises(TypeError, match="seed"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=None, row_std=torch.ones(6))
    with pytest.raises(ValueError, match="row_std must hold finite values"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=1, row_std=torch.full((6,), float("nan")))


# ----------------------------------------------------------------------------------------------------------
# Variants against PEFT itself run on an explicitly perturbed float64 copy
# ----------------------------------------------------------------------------------------------------------

class MLP(torch.nn.Module):
    """Odd sizes; biases on both layers (lora_bias needs them)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(29, 37)
        self.down = torch.nn.Linear(37, 23)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class ConvMLP(MLP):
    """GPT-2's Conv1D layers (weights stored (in, out)), same sizes."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        torch.nn.Module.__init__(self)
        self.up = Conv1D(37, 29)
        self.down = Conv1D(23, 37)
        with torch.no_grad():
            for layer in (self.up, self.down):
                layer.bias.normal_()


def _variant_config(kind):
    from peft import AdaLoraConfig, LoraConfig

    common = dict(target_modules=["up", "down"])
    if kind == "adalora":
        return AdaLoraConfig(init_r=5, target_r=2, lora_alpha=6, tinit=1, tfinal=1, deltaT=1, total_step=6,
                             **common)
    options = {"dora": dict(use_dora=True), "dora-dropout": dict(use_dora=True, lora_dropout=0.3),
               "dora-conv1d": dict(use_dora=True, fan_in_fan_out=True),
               "lora_bias": dict(lora_bias=True), "lora": {}, "rslora": dict(use_rslora=True),
               # initialisations; PiSSA and OLoRA rewrite the base weight into a residual
               "gaussian": dict(init_lora_weights="gaussian"), "pissa": dict(init_lora_weights="pissa"),
               "pissa_niter_2": dict(init_lora_weights="pissa_niter_2"), "olora": dict(init_lora_weights="olora"),
               }[kind]
    return LoraConfig(r=3, lora_alpha=6, **common, **options)


def nontrivial_peft_model(base, config, std=0.3):
    """``get_peft_model(base, config)`` with every adapter non-trivial: B (and its bias under lora_bias), E and
    the DoRA magnitude moved off their initial values, so the update and the magnitude both matter."""
    from peft import get_peft_model

    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                p.normal_(std=std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def variant_model(kind, seed=0):
    """A PEFT model of ``kind`` over :class:`MLP` (:class:`ConvMLP` for the Conv1D kinds), adapters non-trivial."""
    torch.manual_seed(seed)
    return nontrivial_peft_model(ConvMLP() if kind.endswith("conv1d") else MLP(), _variant_config(kind))


class _FixedDropout(torch.nn.Module):
    """Dropout with a mask recorded from another run."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.scale = mask, 1.0 / (1.0 - p)

    def forward(self, x):
        return x * self.mask.to(x.dtype) * self.scale


def _record_dropout_masks(model):
    masks, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: masks.__setitem__(name, (out != 0) & (inp[0] != 0))))
    return masks, handles


def perturbed_float64_copy(plain, ctl, masks=None):
    """``plain`` (the PEFT model before Flat-LoRA) in float64 with ``c·Z`` added into each adopted layer's
    frozen weight, and the dropout masks the Flat-LoRA run drew: PEFT's own forward is the oracle."""
    import copy

    oracle = copy.deepcopy(plain).double()
    with torch.no_grad():
        for name, layer in ctl.layers.items():
            if not layer.noise_active:
                continue
            target = oracle.get_submodule(name).get_base_layer().weight
            m, n = layer.logical_weight().shape if hasattr(layer, "logical_weight") else target.shape
            eps = layer.noise_row_std.double()[:, None] * fk.generate_noise(layer.noise_seed, m, n).double()
            target += eps.t() if layer.fan_in_fan_out else eps
    for name, mask in (masks or {}).items():
        parent, _, child = name.rpartition(".")
        module = oracle.get_submodule(name)
        oracle.get_submodule(parent)._modules[child] = _FixedDropout(mask, module.p)
    return oracle


def train_three_steps_frozen_bitwise(model, ctl, opt):
    """Three optimizer steps with the controller, then: every frozen weight bitwise as it was."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    for _ in range(3):
        model(torch.randn(6, 29)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("kind", ["dora", "dora-dropout", "dora-conv1d", "lora_bias", "adalora"])
def test_variant_forward_and_gradients_equal_peft_on_a_perturbed_float64_copy(kind):
    import copy

    model = variant_model(kind)
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=11, strict=True)
    assert sorted(ctl.layers) == ["base_model.model.down", "base_model.model.up"]
    expected_class = fk.FlatSVDLinear if kind == "adalora" else fk.FlatLoraLinear
    assert all(type(layer) is expected_class and layer.noise_active for layer in ctl.layers.values())
    model.train()
    masks, handles = _record_dropout_masks(model)
    x = torch.randn(4, 3, 29, requires_grad=True)
    y = model(x)
    for handle in handles:
        handle.remove()
    assert bool(masks) == (kind == "dora-dropout")
    oracle = perturbed_float64_copy(plain, ctl, masks).train()
    x64 = x.detach().double().requires_grad_()
    y64 = oracle(x64)
    assert_close_rel(y, y64, torch.float32, f"{kind} forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_rel(x.grad, x64.grad, torch.float32, f"{kind} grad x")
    oracle_params = trainable(oracle)
    params = trainable(model)
    assert params.keys() == oracle_params.keys() and params
    for name, p in params.items():
        assert_close_rel(p.grad, oracle_params[name].grad, torch.float32, f"{kind} grad {name}")
    # the noise matters: PEFT's forward on the unperturbed weights is far from it
    plain.train()
    with torch.no_grad():
        clean = plain.double()(x64) if not masks else None
    if clean is not None:
        assert rel_err(y, clean) > 1e-3


@pytest.mark.parametrize("kind", ["dora", "dora-conv1d", "lora_bias", "adalora"])
def test_c_comes_from_the_weight_peft_merge_writes(kind):
    import copy

    model = variant_model(kind)
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    ctl = fk.apply_flat_lora(model, sigma=0.2, schedule="constant", strict=True)
    for name, layer in ctl.layers.items():
        weight = merged.get_submodule(name).get_base_layer().weight
        weight = weight.t() if layer.fan_in_fan_out else weight
        expected = 0.2 * weight.double().norm(dim=1) / weight.shape[1] ** 0.5
        torch.testing.assert_close(layer.noise_row_std.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["rslora", "gaussian", "pissa", "pissa_niter_2", "olora"])
def test_initialisations_and_rslora_equal_peft_on_a_perturbed_float64_copy(kind):
    import copy

    model = variant_model(kind)
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=11, strict=True)
    assert len(ctl.layers) == 2 and all(layer.noise_active for layer in ctl.layers.values())
    merged = copy.deepcopy(plain)
    merged.merge_adapter()  # c from W_residual + s B A, the weight merge writes
    for name, layer in ctl.layers.items():
        weight = merged.get_submodule(name).get_base_layer().weight.double()
        torch.testing.assert_close(layer.noise_row_std.double(), 0.3 * weight.norm(dim=1) / weight.shape[1] ** 0.5,
                                   rtol=1e-5, atol=0)
    x = torch.randn(4, 29)
    model.train()
    assert_close_rel(model(x), perturbed_float64_copy(plain, ctl).train()(x.double()), torch.float32, kind)


@pytest.mark.parametrize("kind", ["dora", "dora-dropout", "lora_bias", "adalora", "pissa"])
def test_variant_trains_leaves_frozen_weights_bitwise_and_saves_a_plain_peft_adapter(kind, tmp_path):
    import copy

    from peft import PeftModel

    model = variant_model(kind)
    base = copy.deepcopy(model).unload()  # the base the adapter belongs to (PiSSA's residual one)
    initial = {n: p.detach().clone() for n, p in trainable(model).items()}
    ctl = fk.apply_flat_lora(model, sigma=0.1, schedule="constant", seed=3, strict=True)
    train_three_steps_frozen_bitwise(model, ctl, torch.optim.AdamW(trainable(model).values(), lr=1e-2))
    moved = [n for n, p in trainable(model).items() if not torch.equal(p, initial[n])]
    assert moved == list(initial), set(initial) - set(moved)
    # as PEFT's PiSSA guide says: else loading would decompose the residual base again
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base, tmp_path)  # plain PEFT
    assert not any(type(m).__name__.startswith("Flat") for m in loaded.modules())
    x = torch.randn(5, 29)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _check_c_is_from_the_masked_adalora_weight(ctl, sigma):
    for name, layer in ctl.layers.items():
        weight = layer.get_base_layer().weight + layer.get_delta_weight("default")  # E as masked now
        expected = sigma * weight.double().norm(dim=1) / weight.shape[1] ** 0.5
        torch.testing.assert_close(layer.noise_row_std.double(), expected, rtol=1e-5, atol=0, msg=name)


def _adalora_budget_reached(model):
    kept = sum(int((m.lora_E["default"] != 0).sum()) for m in model.modules() if hasattr(m, "lora_E"))
    config = model.peft_config["default"]
    return kept == config.target_r * 2 and config.rank_pattern is not None


def test_adalora_rank_allocator_runs_beside_the_controller_in_a_plain_loop():
    model = variant_model("adalora")  # init_r 5 -> target_r 2 over total_step=6
    ctl = fk.apply_flat_lora(model, sigma=0.1, schedule="constant", seed=3, strict=True)
    opt = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for step in range(6):
        model(torch.randn(6, 29)).square().mean().backward()
        opt.step()
        model.base_model.update_and_allocate(step)  # AdaLoRA's step: needs the gradients, masks E
        ctl.step()  # then Flat-LoRA's: the next c comes from the masked weights
        opt.zero_grad()
        _check_c_is_from_the_masked_adalora_weight(ctl, 0.1)
    assert _adalora_budget_reached(model)


def test_adalora_rank_allocator_runs_beside_the_callback_under_the_trainer(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x, labels):
            return {"loss": (self.mlp(x) - labels).square().mean()}

    class AdaLoraAllocation(TrainerCallback):
        """AdaLoRA's own step: after optimizer.step(), while the gradients are still there, and before
        FlatLoraCallback's on_step_end draws the next sample."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    class CheckSample(TrainerCallback):
        checked = 0

        def on_step_end(self, args, state, control, **kwargs):
            _check_c_is_from_the_masked_adalora_weight(flat.controller, 0.1)
            CheckSample.checked += 1

    from peft import get_peft_model

    torch.manual_seed(0)
    config = _variant_config("adalora")
    config.target_modules = ["mlp.up", "mlp.down"]
    model = get_peft_model(Regression(), config)
    data = [{"x": torch.randn(29), "labels": torch.randn(23)} for _ in range(12)]
    flat = fk.FlatLoraCallback(sigma=0.1, schedule="constant", seed=3, strict=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraAllocation(), flat, CheckSample()]).train()
    assert CheckSample.checked == 6 and len(flat.controller.layers) == 2
    assert _adalora_budget_reached(model)


def test_lora_ga_is_adopted_exact_and_saves(tmp_path):
    """LoRA-GA (PEFT's init_lora_weights="lora_ga"): like PiSSA it rewrites the base weight, so ``c`` and the
    oracle both start from the residual base the initialisation leaves."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    torch.manual_seed(0)
    model = MLP()
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    batches = [torch.randn(8, 29) for _ in range(2)]

    def train_step():
        for batch in batches:
            model(batch).square().mean().backward()

    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    preprocess_loraga(model, config, train_step)
    model = get_peft_model(model, config)
    assert not torch.equal(model.base_model.model.up.base_layer.weight, original["up.weight"])  # the residual base
    plain = copy.deepcopy(model)
    residual_base = copy.deepcopy(model).unload()
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=2, strict=True)
    assert len(ctl.layers) == 2 and all(layer.noise_active for layer in ctl.layers.values())
    oracle = perturbed_float64_copy(plain, ctl).train()
    model.train()
    x = torch.randn(5, 29)
    assert_close_rel(model(x), oracle(x.double()), torch.float32, "LoRA-GA forward")
    train_three_steps_frozen_bitwise(model, ctl, torch.optim.AdamW(trainable(model).values(), lr=1e-2))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(residual_base, tmp_path)  # on the residual base LoRA-GA made
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The edges: adapter switching, merged adapters, models Flat-LoRA cannot drive
# ----------------------------------------------------------------------------------------------------------

def test_set_adapter_draws_c_for_the_new_adapter_and_a_hidden_switch_raises():
    import copy

    from peft import LoraConfig

    model = variant_model("lora")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["up"]))  # on `up` only
    with torch.no_grad():
        model.base_model.model.up.lora_B["other"].weight.normal_(std=0.5)
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=4)
    up, down = ctl.layers["base_model.model.up"], ctl.layers["base_model.model.down"]
    c_default, seed = up.noise_row_std.clone(), up.noise_seed

    model.set_adapter("other")
    assert up.noise_adapter == "other" and up.noise_seed == seed
    merged = up.base_layer.weight + up.get_delta_weight("other")
    torch.testing.assert_close(up.noise_row_std, 0.3 * merged.norm(dim=1) / 29 ** 0.5, rtol=1e-5, atol=0)
    assert not down.noise_active  # no weights for "other" there: PEFT's base layer alone
    plain.set_adapter("other")
    oracle = perturbed_float64_copy(plain, ctl).train()
    model.train()
    x = torch.randn(4, 29)
    assert_close_rel(model(x), oracle(x.double()), torch.float32, "after set_adapter('other')")

    model.set_adapter("default")
    assert torch.equal(up.noise_row_std, c_default) and down.noise_active
    for layer in (up, down):  # an active adapter changed behind set_adapter's back
        layer._active_adapter = ["other"]
    with pytest.raises(RuntimeError, match="drawn for adapter 'default', but 'other' is active"):
        model(x)


def test_a_merged_adapter_is_refused_with_a_clear_error():
    model = variant_model("lora")
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"LoRA layer base_model.model.up has merged adapters \['default'\].*"
                                           r"unmerge_adapter\(\)"):
        fk.apply_flat_lora(model, sigma=0.1, schedule="constant")
    assert not any(isinstance(m, fk.FlatLoraLinear) for m in model.modules())  # nothing changed
    model.unmerge_adapter()
    ctl = fk.apply_flat_lora(model, sigma=0.1, schedule="constant")
    model.merge_adapter()
    model.train()
    with pytest.raises(RuntimeError, match="merged adapters"):
        model(torch.randn(2, 29))
    with pytest.raises(RuntimeError, match="merged adapters"):
        ctl.step()
    model.eval()
    model(torch.randn(2, 29))  # evaluating a merged model is PEFT's business
    model.unmerge_adapter()
    ctl.resample()
    model.train()
    model(torch.randn(2, 29)).sum().backward()


def test_a_peft_model_with_no_drivable_layer_gets_each_reason_not_wrap_advice():
    from peft import LoraConfig, get_peft_model

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 4)

    model = get_peft_model(Embed(), LoraConfig(r=2, target_modules=["emb"]))
    with pytest.raises(ValueError) as error:
        fk.apply_flat_lora(model, sigma=0.1, schedule="constant")
    message = str(error.value)
    assert "none of the model's 1 LoRA layers" in message
    assert "skipped base_model.model.emb: peft.tuners.lora.layer.Embedding: not a LoRA Linear layer" in message
    assert "target Linear modules" in message and "get_peft_model" not in message


def test_4bit_layers_take_lora_bias_and_leave_dora_untouched():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners import lora

    from flatlora_kernels.quant4bit import PackedWeight4bit

    from .helpers import float64_flat_lora

    def layer_4bit(**options):
        base = bnb.nn.Linear4bit(33, 21, bias=True, quant_type="nf4", compute_dtype=torch.float32)
        base.weight = bnb.nn.Params4bit(0.1 * torch.randn(21, 33), requires_grad=False, quant_type="nf4")
        base = base.to("cpu").requires_grad_(False)  # .to quantizes
        layer = lora.bnb.Linear4bit(base, "default", config=LoraConfig(r=3, lora_alpha=6, **options), r=3,
                                    lora_alpha=6, **options)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(std=0.3)
            if layer.lora_B["default"].bias is not None:
                layer.lora_B["default"].bias.normal_(std=0.3)
        return layer

    layer = fk.FlatLoraLinear4bit.from_lora_linear(layer_4bit(lora_bias=True))
    layer.sample_noise(seed=8, sigma=0.3)
    weight = PackedWeight4bit.from_bnb(layer.base_layer.weight).dequantize()
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    bias = layer.base_layer.bias + scaling * layer.lora_B["default"].bias
    x = torch.randn(6, 33)
    y64, _ = float64_flat_lora(x, weight, bias, a, b, scaling, 8, layer.noise_row_std)
    y = layer(x)
    assert_close_rel(y, y64, torch.float32, "4-bit lora_bias forward")
    y.sum().backward()
    assert layer.lora_B["default"].bias.grad is not None

    dora = torch.nn.Module()
    dora.layer = layer_4bit(use_dora=True)
    with pytest.raises(ValueError, match="DoraLinearVariant variant; Flat-LoRA noise supports vanilla LoRA, "
                                         "lora_bias on this layer type"):
        fk.apply_flat_lora(dora, sigma=0.1, schedule="constant")


def test_loraplus_optimizer_and_modules_to_save():
    """LoRA+ (PEFT's create_loraplus_optimizer) on a model that also trains a whole module (modules_to_save)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["up"], modules_to_save=["down"]))
    with torch.no_grad():
        model.base_model.model.up.lora_B["default"].weight.normal_(std=0.3)
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=6, strict=True)
    assert list(ctl.layers) == ["base_model.model.up"] and not ctl.skipped  # the saved module is no LoRA layer
    x = torch.randn(4, 29)
    model.train()
    assert_close_rel(model(x), perturbed_float64_copy(plain, ctl).train()(x.double()), torch.float32, "forward")
    opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    train_three_steps_frozen_bitwise(model, ctl, opt)
    saved_copy = model.base_model.model.down.modules_to_save["default"].weight
    assert not torch.equal(saved_copy, plain.base_model.model.down.modules_to_save["default"].weight)


def test_all_linear_on_a_llama():
    import copy

    from peft import LoraConfig

    from .helpers import llama

    torch.manual_seed(0)
    model = nontrivial_peft_model(llama()[0], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), std=0.05)
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=6, strict=True)
    assert len(ctl.layers) == 14  # 7 projections x 2 blocks; lm_head is never targeted by "all-linear"
    model.train()
    ids = torch.randint(0, 96, (2, 7))
    logits = model(input_ids=ids).logits
    expected = perturbed_float64_copy(plain, ctl).train()(input_ids=ids).logits
    assert_close_rel(logits, expected, torch.float32, "all-linear Llama logits")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_in_bfloat16_keeps_the_dtype_and_equals_peft_on_a_perturbed_copy(dropout):
    import copy

    from peft import LoraConfig

    torch.manual_seed(0)
    model = nontrivial_peft_model(MLP().to(torch.bfloat16), LoraConfig(
        r=3, lora_alpha=6, target_modules=["up", "down"], use_dora=True, lora_dropout=dropout))
    plain = copy.deepcopy(model)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=5, strict=True)
    model.train()
    masks, handles = _record_dropout_masks(model)
    x = torch.randn(4, 29, dtype=torch.bfloat16)
    y = model(x)
    for handle in handles:
        handle.remove()
    assert y.dtype == torch.bfloat16
    oracle = perturbed_float64_copy(plain, ctl, masks).train()
    assert_close_rel(y, oracle(x.double()), torch.bfloat16, "bf16 DoRA forward")
