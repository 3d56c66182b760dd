#!/usr/bin/env python3
"""Writes PyTorch's fp32 answers for the GPU benchmark's random models, which the benchmark's
`accuracy` section (`worker/examples/gpu_bench.rs`) sets the worker's CUDA backend against.

    python3 worker/bench/gpu_reference.py MODELS_DIR

Run after `gpu_models.py MODELS_DIR`; adds `reference.json` to each model folder:

    bert-base, minilm   3 sequences of 128, 77 and 5 random ids (padded into one batch with an
                        attention mask): the ids and `last_hidden_state` of the real positions
    llama-1b            2 prompts of 32 and 7 random ids: the ids, each prompt's last-position
                        logits, 16 greedy tokens (KV cache, as the worker decodes), and per
                        greedy step the gap between the top two logits and the largest |logit|,
                        so that the Rust side can tell which greedy choices are well defined

The ids come from fixed seeds and are stored, so the Rust side reads them rather than drawing
its own. PyTorch runs in fp32 with TF32 off (the worker's fp32 products use none either) and
eager attention (the plain definition), on the GPU when there is one and on the CPU otherwise.
Floats are rounded to 7 significant digits (1.6 MB for bert-base, 3 MB in all).

A script of its own rather than part of `gpu_models.py`: it reads the weights back from the
folder, i.e. the bytes the worker loads, and it can be changed (inputs, figures) without
rebuilding the models. Idempotent: a `reference.json` whose key (this script's version, the
inputs, the folder's `bench-spec.json`, the size and time of `model.safetensors`) matches is
kept; otherwise the stale one is removed and a new one written through a scratch file, so an
interrupted or failed run never leaves a file that looks finished. A model that fails does not
stop the others; the exit status says whether every folder has its reference.
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import BertModel, LlamaForCausalLM

# Importing the generator's specs (the one list of model names) must not leave a __pycache__
# folder in the checkout.
sys.dont_write_bytecode = True
from gpu_models import SPECS  # noqa: E402

# Bump when what is computed changes, so that existing references are recomputed.
VERSION = 1

# Inputs per model kind. Ids start above the special tokens (BERT: above the ~1000 reserved
# and unused entries of its real vocabulary; Llama: above unk, bos, eos); the lengths differ so
# that padding (BERT) and short prompts (Llama) are exercised.
INPUTS = {
    "bert": {"seed": 1, "lengths": [128, 77, 5], "first_id": 1000},
    "llama": {"seed": 2, "lengths": [32, 7], "first_id": 3, "greedy_tokens": 16},
}

REFERENCE = "reference.json"


def rounded(tensor):
    """A nested list of floats rounded to 7 significant digits (f32 carries about 7.2)."""
    values = tensor.detach().to(torch.float64).cpu().tolist()

    def walk(v):
        return [walk(x) for x in v] if isinstance(v, list) else float(f"{v:.7g}")

    return walk(values)


def random_ids(inputs, vocab):
    """One list of ids per length, drawn in order from the inputs' seed."""
    generator = torch.Generator().manual_seed(inputs["seed"])
    return [
        torch.randint(inputs["first_id"], vocab, (n,), generator=generator).tolist() for n in inputs["lengths"]
    ]


def bert_reference(folder, inputs, device):
    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager")
    model = model.to(device, torch.float32).eval()
    ids = random_ids(inputs, model.config.vocab_size)
    longest = max(len(s) for s in ids)
    # Right padding with id 0 and a mask, as the worker's `Batch` pads.
    padded = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for b, seq in enumerate(ids):
        padded[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
    hidden = model(input_ids=padded.to(device), attention_mask=mask.to(device)).last_hidden_state
    return {
        "input_ids": ids,
        "lengths": [len(s) for s in ids],
        "hidden_size": model.config.hidden_size,
        "last_hidden_state": [rounded(hidden[b, : len(seq)]) for b, seq in enumerate(ids)],
    }


def greedy(model, prompt, tokens):
    """The prompt's last-position logits and `tokens` greedy ids through the KV cache, with the
    top-two gap and the largest |logit| of the logits each id was chosen from."""
    out = model(input_ids=prompt, use_cache=True)
    logits = out.logits[0, -1]
    last = logits
    chosen, gaps, scales = [], [], []
    for step in range(tokens):
        top = torch.topk(logits, 2).values
        # argmax returns the first of equal maxima, as the worker's host-side argmax does.
        token = int(torch.argmax(logits))
        chosen.append(token)
        gaps.append(float(top[0] - top[1]))
        scales.append(float(logits.abs().max()))
        if step + 1 < tokens:
            nxt = torch.tensor([[token]], device=prompt.device)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[0, -1]
    return last, chosen, gaps, scales


def llama_reference(folder, inputs, device):
    model = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model = model.to(device, torch.float32).eval()
    ids = random_ids(inputs, model.config.vocab_size)
    out = {"input_ids": ids, "last_logits": [], "greedy_ids": [], "greedy_top2_gap": [], "greedy_max_abs_logit": []}
    for seq in ids:
        prompt = torch.tensor([seq], device=device)
        last, chosen, gaps, scales = greedy(model, prompt, inputs["greedy_tokens"])
        out["last_logits"].append(rounded(last))
        out["greedy_ids"].append(chosen)
        out["greedy_top2_gap"].append([float(f"{g:.7g}") for g in gaps])
        out["greedy_max_abs_logit"].append([float(f"{s:.7g}") for s in scales])
    return out


def reference_key(folder, kind):
    """What the reference depends on: the model (its spec and the weights file on disk) and the
    inputs. None when the folder was not written by gpu_models.py."""
    marker = folder / "bench-spec.json"
    weights = folder / "model.safetensors"
    if not marker.exists() or not weights.exists():
        return None
    stat = weights.stat()
    return {
        "version": VERSION,
        "inputs": INPUTS[kind],
        "model": json.loads(marker.read_text()).get("spec"),
        "weights": {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }


def existing_key(path):
    try:
        return json.loads(path.read_text()).get("key")
    except (OSError, ValueError):
        return None


def write_reference(folder, kind, key, device):
    compute = bert_reference if kind == "bert" else llama_reference
    body = compute(folder, INPUTS[kind], device)
    provenance = {"torch": torch.__version__, "device": device, "dtype": "fp32", "tf32": False, "attention": "eager"}
    scratch = folder / f".{REFERENCE}.partial"
    scratch.write_text(json.dumps({"key": key, "kind": kind, "computed": provenance, **body}, separators=(",", ":")))
    scratch.rename(folder / REFERENCE)


def disable_tf32():
    """fp32 products in full fp32, as the worker's cuBLAS calls run them."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def ensure_reference(name, folder, device):
    """Writes the folder's reference unless an up-to-date one is there; False when it cannot."""
    kind = SPECS[name]["kind"]
    key = reference_key(folder, kind)
    if key is None:
        print(f"gpu_reference: {folder} has no model from gpu_models.py (run it first)", file=sys.stderr)
        return False
    path = folder / REFERENCE
    if existing_key(path) == key:
        print(f"gpu_reference: {name}: reference already in {folder}", file=sys.stderr)
        return True
    # A stale reference must not outlive a failed recomputation: it would describe other weights.
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        write_reference(folder, kind, key, device)
    except Exception as e:  # noqa: BLE001 - one model's failure must not cost the others' references
        print(f"gpu_reference: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    print(
        f"gpu_reference: {name}: {REFERENCE} ({path.stat().st_size / 1e6:.1f} MB) written in "
        f"{time.perf_counter() - started:.1f} s on {device}",
        file=sys.stderr,
    )
    return True


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MODELS_DIR")
    models = Path(sys.argv[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    disable_tf32()
    torch.set_grad_enabled(False)
    failed = [name for name in SPECS if not ensure_reference(name, models / name, device)]
    if failed:
        sys.exit(f"gpu_reference: no reference for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
