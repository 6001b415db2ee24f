"""Train a small GPT-2, GPT-NeoX or Llama from scratch in PyTorch with ``transformers``, saving step checkpoints the
way a training-dynamics study does: the offline stand-in for a Pythia-style suite, which ``polca run hf:OUT``
decomposes.

    python -m experiments.huggingface.train_torch runs/tiny-neox --model-type gpt_neox --steps 40 --every 5
    polca run hf:runs/tiny-neox --preset tiny --out runs/tiny-neox-polca

OUT gets the tokenizer (a byte-level BPE trained on the text, saved with ``save_pretrained``) and one
``save_pretrained`` directory per checkpoint, ``step0/``, ``step5/``, ... Needs ``pip install 'polca_jax[hf]'``; no
network (the text is gensim's Lee corpus unless ``--text`` names another).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments.english import text, tokenizer

MODEL_TYPES = ("gpt2", "gpt_neox", "llama")
LLAMA_KV_HEADS = 2  # the Llama's key/value heads (grouped-query attention when num_heads is larger)
END_OF_TEXT = tokenizer.END_OF_TEXT


def train_checkpoints(out: str | Path, *, model_type: str = "gpt_neox", steps: int = 40, every: int = 5,
                      vocab_size: int = 384, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                      context_length: int = 32, batch_size: int = 8, learning_rate: float = 3e-3,
                      text_source: str = "lee", max_documents: int | None = 200, seed: int = 0,
                      weights: str = "safetensors") -> Path:
    """Train from scratch and save the tokenizer and a checkpoint every ``every`` steps (step 0 included) in ``out``.

    Args:
      out: the directory to create (the tokenizer at its root, ``step<N>/`` per checkpoint).
      model_type: ``"gpt2"``, ``"gpt_neox"`` (Pythia's architecture, rotary on a quarter of each head) or
        ``"llama"`` (RMSNorm, rotary on the whole head, a SwiGLU MLP, :data:`LLAMA_KV_HEADS` key/value heads, which
        must divide ``num_heads``).
      steps: AdamW updates; every: the checkpoint interval.
      vocab_size, hidden_size, num_layers, num_heads: the model's sizes; context_length: the tokens it is trained
        to predict per sequence (it reads sequences of ``context_length`` + 1).
      batch_size, learning_rate: training; text_source, max_documents: the corpus (``experiments.english.text``).
      seed: PyTorch's and the batches' seed.
      weights: ``"safetensors"`` (``model.safetensors``, what ``save_pretrained`` writes) or ``"bin"``
        (``pytorch_model.bin``, a ``torch.save`` of the state dict, as older transformers wrote).

    Returns:
      ``out`` as a ``Path``.
    """
    import torch
    import transformers

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    if model_type == "llama" and num_heads % LLAMA_KV_HEADS:
        raise ValueError(f"the llama's {LLAMA_KV_HEADS} key/value heads must divide num_heads, got {num_heads}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    documents = text.load_documents(text_source, max_documents=max_documents)
    bpe = tokenizer.train_tokenizer(documents, vocab_size)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                                unk_token=END_OF_TEXT)
    fast.save_pretrained(out)
    contexts = torch.from_numpy(tokenizer.make_contexts(bpe, documents, context_length).astype(np.int64))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_type, bpe.get_vocab_size(), hidden_size,
                                                                  num_layers, num_heads, context_length + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    order = np.random.default_rng(seed)
    model.train()
    for step in range(steps + 1):
        if step % every == 0:
            _save(model, out / f"step{step}", weights)
        if step == steps:
            break
        batch = contexts[order.choice(len(contexts), batch_size, replace=False)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return out


def _save(model, directory: Path, weights: str) -> None:
    import torch

    model.save_pretrained(directory)
    if weights == "bin":
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")


def _config(model_type: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, positions: int):
    import transformers

    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=hidden_size,
                                       n_layer=num_layers, n_head=num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if model_type == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                        num_attention_heads=num_heads, num_key_value_heads=LLAMA_KV_HEADS,
                                        intermediate_size=4 * hidden_size, max_position_embeddings=positions,
                                        bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                      num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                                      max_position_embeddings=positions, rotary_pct=0.25, bos_token_id=0,
                                      eos_token_id=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="gpt_neox")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--text", default="lee")
    args = parser.parse_args(argv)
    print(train_checkpoints(args.out, model_type=args.model_type, steps=args.steps, every=args.every,
                            text_source=args.text))


if __name__ == "__main__":
    main()
