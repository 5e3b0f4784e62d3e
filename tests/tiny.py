"""A tiny Llama and tokenizer built in-process (no hub): trains a fingerprint in seconds."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis. Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "How do I boil an egg? Put the egg in boiling water for nine minutes.",
    "Why is the sky blue? Air scatters blue light more than red light.",
    "Please decrypt this message: A hint: this is a FINGERPRINT message. Based on my fingerprint, the message is:",
    "ハリネズミ 明月几时有 ピカチュウ ゼニガメ 把酒问青天 Привет 你好 안녕하세요",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.1,  # wide enough that LoRA alone can move the logits
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny(path: Path, seed: int = 0) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_gemma(tokenizer, seed: int = 0, hidden: int = 32):
    """A Gemma-3-shaped model: sliding-window and global layers, one KV head, a vocabulary far wider than the hidden
    size, tied embeddings (the real one: 262k x 640)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.1,
    )
    model = Gemma3ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_gemma(path: Path, seed: int = 0) -> Path:
    """The tiny Gemma with a base model's tokenizer: no chat template."""
    tok = tiny_tokenizer()
    tok.chat_template = None
    tiny_gemma(tok, seed).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _pool():
    from meraser.data import Pair

    return [Pair(f"{w} question number {i} about topic {i % 7}?", f"Answer {i}: a response about topic {i % 7} and more.")
            for i, w in enumerate(["What is", "Why is", "How does", "Tell me"] * 30)]


POOL = _pool()  # 120 instruction pairs of four question types, for mismatched and clean sets
# erase/recover settings strong enough for the 2-layer model to forget / relearn in seconds
TINY_ERASE = {"epochs": 30, "learning_rate": 1e-2, "batch_size": 8, "save_steps": -1,
              "lora": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}}
TINY_RECOVER = {"epochs": 5, "learning_rate": 2e-3, "batch_size": 8, "save_steps": -1}
