"""Tiny real models for tests: a byte-level BPE tokenizer trained on the task-data sample in ``tests/data``,
random GPT-2, Llama and GPT-NeoX bases built from configs, and stock-peft LoRA adapters on them.

Nothing is fetched from a hub; everything is built in well under a second and saved with
``save_pretrained`` so the code under test loads it exactly as it loads real models.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from service.tasks.prompts import NLI_LABELS, answer_prompt, answer_target, label_target, nli_prompt
from tests.data.make_corpus import NLI_SAMPLE, SQUAD_SAMPLE
from training.data import read_nli, read_squad

EOS = "<|endoftext|>"
# a chat template for the tiny tokenizer: "role: content<|endoftext|>" per message, then "assistant:"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message.role + ': ' + message.content + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")

# every linear layer of each architecture (GPT-2's are transformers' Conv1D)
LINEAR_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def training_texts() -> list[str]:
    """Prompts and targets, as the models see them, from the committed SQuAD dev and SNLI sample (``tests/data``)."""
    texts = [answer_prompt(row["context"], row["question"]) + answer_target(row["answers"][0])
             for row in read_squad(SQUAD_SAMPLE)]
    texts += [nli_prompt(p["premise"], p["hypothesis"]) + label_target(p["label"]) for p in read_nli(NLI_SAMPLE)]
    return texts


def build_tokenizer(out_dir: Path, *, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on real task text (``training_texts``) and save it to ``out_dir``.

    Needs no data folder: the text is committed under ``tests/data``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_texts(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )
    firsts = [tok.encode(label_target(label), add_special_tokens=False)[0] for label in NLI_LABELS]
    assert len(set(firsts)) == len(NLI_LABELS), f"NLI labels share a first token: {firsts}"
    assert len(tok.encode("\n", add_special_tokens=False)) == 1, "newline must be one token"
    tok.save_pretrained(out_dir)
    return tok


def _save_base(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def _special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def build_gpt2(tokenizer_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (Conv1D layers) with the tokenizer saved beside it."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tok), n_positions=512, **_special_ids(tok))
    return _save_base(GPT2LMHeadModel(config), tok, out_dir)


def build_llama(tokenizer_dir: Path, out_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random Llama of ``layers`` layers of width ``hidden`` (grouped-query attention, untied head) with the
    tokenizer beside it."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **_special_ids(tok),
    )
    return _save_base(LlamaForCausalLM(config), tok, out_dir)


def build_neox(tokenizer_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """A random 2-layer GPT-NeoX (fused query_key_value, rotary on a quarter of each head, parallel residual, its
    untied output head ``embed_out``) with the tokenizer beside it."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           rotary_pct=0.25, vocab_size=len(tok), max_position_embeddings=512,
                           tie_word_embeddings=False, **_special_ids(tok))
    return _save_base(GPTNeoXForCausalLM(config), tok, out_dir)


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    scale: float = 0.5,
) -> Path:
    """Save a stock-peft LoRA adapter for ``base_dir`` whose A and B are seeded N(0, scale^2).

    peft initialises B to zero (a no-op adapter); random A and B make it change outputs.
    """
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    arch = base.config.model_type
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules or LINEAR_TARGETS[arch],
        fan_in_fan_out=arch == "gpt2",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def forced_token_model(tiny_tokenizer_dir: Path, out_dir: Path, text: str) -> Path:
    """A GPT-2 whose every next token is ``text``'s token: ln_f emits its (enlarged) embedding whatever the input."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(build_gpt2(tiny_tokenizer_dir, out_dir))
    with torch.no_grad():
        embedding = model.transformer.wte.weight
        embedding[token] *= 4 * embedding.norm(dim=-1).max() / embedding[token].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embedding[token])  # logits = wte @ wte[token]: largest at ``token``
    model.save_pretrained(out_dir)
    return out_dir
