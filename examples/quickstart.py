"""Quick start: turn a PEFT LoRA model into a Flat-LoRA one and train a few steps.

    python examples/quickstart.py

Runs on the CPU (reference backend) or on a GPU (Triton kernels). Prints the loss, the backend
and proof that the frozen weights did not move.
"""

import logging
import math

# bitsandbytes (imported by peft) looks for an optional 4-bit CPU kernel in the `kernels` package when it is
# imported, and logs a warning when that package is absent; this example has no 4-bit layer.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "Failed to load CPU gemm_4bit_forward" not in str(record.msg))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

import flatlora_kernels as fk  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    layers = [fk.FlatLoraLinear.from_lora_linear(m) for m in list(model.modules()) if type(m) is LoraLinear]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    x = torch.randn(512, 64, device=device)
    target = torch.sin(x[:, :4].sum(dim=1, keepdim=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sigma, steps = 0.05, 60
    for step in range(steps):
        sigma_t = sigma * 0.5 * (1 - math.cos(math.pi * step / steps))  # the paper's cosine ramp
        for index, layer in enumerate(layers):
            layer.sample_noise(seed=step * len(layers) + index, sigma=sigma_t)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:3d}  sigma_t {sigma_t:.4f}  loss {loss.item():.4f}")
    unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    print(f"backend: {fk.backend_name(device)} on {device}")
    print(f"frozen weights bitwise unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("frozen weights changed")


if __name__ == "__main__":
    main()
