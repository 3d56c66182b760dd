#!/usr/bin/env python3
"""Writes the random-weight models the GPU benchmark runs, from fixed seeds, with transformers.

    python3 worker/bench/gpu_models.py OUT_DIR

Creates under OUT_DIR one Hugging Face folder per model (config.json, model.safetensors in f32,
tokenizer.json, tokenizer_config.json):

    bert-base   BERT-base shape: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522 (~109M)
    minilm      all-MiniLM-L6-v2 shape: 6 layers, hidden 384, 12 heads, FFN 1536 (~22.6M)
    llama-1b    TinyLlama-1.1B shape: 22 layers, hidden 2048, 32 heads, 4 KV heads (head 64),
                SwiGLU FFN 5632, vocab 32000, untied output projection (~1.10B)

Speed is measured on them, and accuracy against PyTorch's own outputs on the same weights
(`gpu_reference.py`), so the weights are the architectures' own random initialisation and the
tokenizers are minimal valid ones (both feed token ids directly). Idempotent: a
folder whose `bench-spec.json` matches the spec below is kept; otherwise it is rebuilt in a
scratch folder and moved into place, so an interrupted run never leaves a folder that looks
finished. Models are initialised on the GPU when there is one (seconds instead of minutes for
the 1.1B model); the seed fixes them either way.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

# Bump when the generation changes, so that existing folders are rebuilt.
VERSION = 1

SPECS = {
    "bert-base": {
        "kind": "bert",
        "seed": 11,
        "config": dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=2,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        ),
    },
    "minilm": {
        "kind": "bert",
        "seed": 12,
        "config": dict(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
            type_vocab_size=2,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        ),
    },
    "llama-1b": {
        "kind": "llama",
        "seed": 13,
        "config": dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            hidden_act="silu",
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
}

WORDS = "the a order refund kettle parcel service quality billing product broken late".split()


def bert_tokenizer():
    """A word-level tokenizer with BERT's special tokens and template ([CLS] ... [SEP])."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok, {"model_max_length": 512, "tokenizer_class": "BertTokenizer"}


def llama_tokenizer():
    """A word-level tokenizer with Llama's special tokens at Llama's ids (unk 0, bos 1, eos 2)."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return tok, {"model_max_length": 2048, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build(name, spec, folder, device):
    torch.manual_seed(spec["seed"])
    if spec["kind"] == "bert":
        config = BertConfig(**spec["config"])
        tok, tok_config = bert_tokenizer()
        with torch.device(device):
            # No pooler: the worker's encoder and the benchmark's PyTorch side use none.
            model = BertModel(config, add_pooling_layer=False)
    else:
        config = LlamaConfig(**spec["config"])
        tok, tok_config = llama_tokenizer()
        with torch.device(device):
            model = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1) + "\n")
    # The worker reads none of it; a stale sampling default must not look meaningful.
    (folder / "generation_config.json").unlink(missing_ok=True)
    return params


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    for name, spec in SPECS.items():
        folder = out / name
        marker = folder / "bench-spec.json"
        wanted = dict(spec, version=VERSION)
        if marker.exists() and json.loads(marker.read_text()).get("spec") == wanted:
            params = json.loads(marker.read_text())["params"]
            print(f"gpu_models: {name} ({params / 1e6:.1f}M parameters) already in {folder}", file=sys.stderr)
            continue
        scratch = out / f".{name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        started = time.perf_counter()
        params = build(name, spec, scratch, device)
        (scratch / "bench-spec.json").write_text(json.dumps({"spec": wanted, "params": params}, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(
            f"gpu_models: {name}: {params / 1e6:.1f}M parameters written to {folder} "
            f"in {time.perf_counter() - started:.1f} s ({device} init)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
