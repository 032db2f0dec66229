"""Make a tiny Llama model directory that a CPU vLLM can serve, without downloading anything.

    .venv-vllm/bin/python scripts/make-tiny-model.py DIR

writes a byte-level BPE tokenizer (trained here on a few sentences, with a chat template so that
``/v1/chat/completions`` works) and the ``config.json`` of a small ``LlamaForCausalLM`` (15M
parameters). There are no weights: serve it with ``--load-format dummy`` (random weights: the
text is nonsense, the serving is real). ``head_dim`` is 64 because the CPU attention refuses
smaller heads on the first request (and the engine then dies). The model is no smaller so that
a long generation outlasts what a test does meanwhile: with hidden size 128 and 2 layers an idle
2-core machine generated 8,128 tokens in about a second. Needs ``tokenizers`` and
``transformers`` (both come with vLLM). Idempotent: a directory that holds the model already is
left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SENTENCES = [
    "The gateway starts a model server when the first request for it arrives.",
    "Requests wait in a bounded queue while every slot of the model is busy.",
    "An idle model is stopped after its timeout to make room for another one.",
    "Tokens stream back to the client as soon as the server generates them.",
    "hello world, how are you today? I am fine, thank you very much.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
MAX_POSITIONS = 8192


def make_tiny_model(directory: Path) -> Path:
    """Write the model into ``directory`` (made if missing) unless it is there; return it."""
    if (directory / "config.json").is_file():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(fast),
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    # Written last: its presence says the model is complete.
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    print(make_tiny_model(Path(sys.argv[1])))
