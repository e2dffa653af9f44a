"""Train a small Mamba-2 language model from scratch with ``mamba2.py``.

The default model shipped with this repository was made with this script, on a
corpus built from the Python standard library's own ``.py`` source files (the
standard library is distributed under the PSF License Agreement, see
``LICENSE.txt`` in the interpreter's stdlib directory).

Reproduce it in two steps::

    # 1. corpus + byte-level BPE tokenizer (a few seconds to a minute)
    python train.py prepare --out data/pystdlib

    # 2. training: 1.8M parameters, 1200 steps x 4096 tokens (~4.9M tokens,
    #    about two epochs); ~20 minutes on one CPU core with --bf16
    python train.py --data data/pystdlib --out models/mamba2-pystdlib \\
        --d-model 192 --n-layer 4 --d-state 64 --headdim 32 --chunk-size 64 \\
        --seq-len 256 --batch-size 16 --steps 1200 --warmup 100 --lr 3e-3 \\
        --bf16 --seed 1337 --plot

The exact arguments of a finished run are stored in ``<out>/train_log.json``.

Other entry points::

    python train.py --quick                  # tiny model, tiny data, seconds
    python train.py plot models/mamba2-pystdlib   # redraw loss.png from the log
    python train.py ... --resume             # continue from <out>/ckpt/ckpt.pt

The subcommand ``prepare`` needs the ``tokenizers`` package; training needs
only ``torch`` and ``mamba2.py`` (``tqdm`` and ``matplotlib`` are optional).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mamba2 import Mamba2Config, Mamba2LMHeadModel

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CKPT_NAME = "ckpt.pt"

# Path components that exclude a file from the corpus: test suites, the IDLE
# application, third-party packages, generated codec tables and the giant
# pydoc topics string, build configuration.
EXCLUDED_PARTS = {
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
    "__pycache__", "encodings", "pydoc_data", "lib-dynload", "_bundled",
}
MAX_FILE_BYTES = 400_000


# --------------------------------------------------------------------------
# Corpus preparation
# --------------------------------------------------------------------------

def list_stdlib_files(stdlib_dir: Path) -> list[Path]:
    """Return the corpus files under ``stdlib_dir``, sorted by relative path.

    Keeps every ``*.py`` file except those below an excluded directory
    (see ``EXCLUDED_PARTS``), under ``config-*`` build directories, the
    generated ``_sysconfigdata_*`` modules, and files above ``MAX_FILE_BYTES``.
    """
    files = []
    for path in stdlib_dir.rglob("*.py"):
        rel = path.relative_to(stdlib_dir)
        parts = rel.parts[:-1]
        if any(p in EXCLUDED_PARTS or p.startswith("config-") for p in parts):
            continue
        if rel.name.startswith("_sysconfigdata_"):
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib_dir).as_posix())


def is_validation_file(rel_path: str, val_fraction: float, seed: int) -> bool:
    """Decide, by a seeded hash of the relative path, if a file is held out."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def read_documents(stdlib_dir: Path, val_fraction: float, seed: int):
    """Read the corpus; return ``(train_docs, val_docs, skipped)``.

    Each document is a ``(relative_path, text)`` pair; newlines are normalised
    to ``\\n``; files that are not valid UTF-8 are skipped.
    """
    train, val, skipped = [], [], []
    for path in list_stdlib_files(stdlib_dir):
        rel = path.relative_to(stdlib_dir).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            continue
        (val if is_validation_file(rel, val_fraction, seed) else train).append((rel, text))
    return train, val, skipped


def train_bpe_tokenizer(texts, vocab_size: int):
    """Train a byte-level BPE tokenizer (``tokenizers`` library) on ``texts``.

    The only special token is ``<|endoftext|>`` (id 0), used as end of text,
    document separator, and as bos/pad token by ``transformers``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def write_tokenizer_config(folder: Path, model_max_length: int) -> None:
    """Write ``tokenizer_config.json`` and ``special_tokens_map.json``.

    With these next to ``tokenizer.json``, ``transformers.AutoTokenizer``
    loads the folder as a ``PreTrainedTokenizerFast``.
    """
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
               "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def make_byte_tokenizer(folder: Path, model_max_length: int = 8192) -> bool:
    """Write a byte-level tokenizer (id = byte value, ``<|endoftext|>`` = 256).

    Used by ``--quick`` on synthetic data so that its output folder is
    complete. Returns False if the ``tokenizers`` package is missing.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return False
    # GPT-2 style printable stand-ins for the 256 byte values, in byte order.
    printable = [b for b in range(256)
                 if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    vocab = {stand_in[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_tokenizer_config(folder, model_max_length)
    return True


def encode_documents(tok, docs, eos_id: int) -> torch.Tensor:
    """Tokenize documents into one stream: ``eos doc1 eos doc2 eos ... docN eos``."""
    ids = [eos_id]
    for enc in tok.encode_batch([text for _, text in docs]):
        ids.extend(enc.ids)
        ids.append(eos_id)
    dtype = torch.uint16 if tok.get_vocab_size() <= 65536 else torch.int32
    return torch.tensor(ids, dtype=torch.int64).to(dtype)


def check_tokenizer_roundtrip(folder: Path, docs) -> str:
    """Load ``folder`` with ``transformers.AutoTokenizer`` and round-trip text.

    Checks that ids agree with the raw ``tokenizers`` encoding and that decode
    gives back the exact text. Returns a status message; raises on mismatch.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return "transformers not installed: AutoTokenizer check skipped"
    from tokenizers import Tokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert hf_tok.eos_token == EOS_TOKEN and hf_tok.eos_token_id == raw.token_to_id(EOS_TOKEN)
    samples = [text[:3000] for _, text in docs[:5]] + ["def f(x):\n    return x  # ünïcode ✓\n"]
    for text in samples:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        if ids != raw.encode(text).ids:
            raise AssertionError("AutoTokenizer ids differ from tokenizers ids")
        back = hf_tok.decode(ids)
        if back != text:
            raise AssertionError(f"round trip failed: {text[:60]!r} -> {back[:60]!r}")
    return f"AutoTokenizer OK ({type(hf_tok).__name__}, {len(samples)} texts round-trip exactly)"


def prepare(argv=None) -> dict:
    """``python train.py prepare``: build corpus, tokenizer and token files."""
    p = argparse.ArgumentParser(
        prog="train.py prepare",
        description="Build the Python-stdlib corpus, train a byte-level BPE "
                    "tokenizer and write train/val token ids.")
    p.add_argument("--out", default="data/pystdlib", help="output folder (default: %(default)s)")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                   help="stdlib directory to read (default: the running interpreter's)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of files held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val file split")
    p.add_argument("--model-max-length", type=int, default=8192,
                   help="model_max_length written to tokenizer_config.json")
    args = p.parse_args(argv)
    # Stay within one core unless the user asked for more.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.time()
    stdlib = Path(args.stdlib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs, skipped = read_documents(stdlib, args.val_fraction, args.seed)
    print(f"corpus: {len(train_docs)} train files, {len(val_docs)} val files "
          f"({len(skipped)} skipped, not UTF-8) from {stdlib}")

    tok = train_bpe_tokenizer([text for _, text in train_docs], args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, args.model_max_length)
    eos_id = tok.token_to_id(EOS_TOKEN)

    train_ids = encode_documents(tok, train_docs, eos_id)
    val_ids = encode_documents(tok, val_docs, eos_id)
    torch.save(train_ids, out / "train.pt")
    torch.save(val_ids, out / "val.pt")
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():
        shutil.copyfile(license_file, out / "LICENSE-PSF.txt")

    train_chars = sum(len(t) for _, t in train_docs)
    val_chars = sum(len(t) for _, t in val_docs)
    meta = {
        "name": "pystdlib",
        "source": f"Python {sys.version.split()[0]} standard library .py files",
        "license": "PSF License Agreement (Python Software Foundation License Version 2)",
        "stdlib_dir": str(stdlib),
        "excluded_dirs": sorted(EXCLUDED_PARTS) + ["config-*"],
        "max_file_bytes": MAX_FILE_BYTES,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id,
        "train": {"files": len(train_docs), "chars": train_chars, "tokens": len(train_ids)},
        "val": {"files": len(val_docs), "chars": val_chars, "tokens": len(val_ids)},
        "chars_per_token": {"train": train_chars / len(train_ids), "val": val_chars / len(val_ids)},
        "val_files": [rel for rel, _ in val_docs],
        "skipped_files": skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for split in ("train", "val"):
        s = meta[split]
        print(f"{split:5s}: {s['files']:5d} files {s['chars']:>10,d} chars {s['tokens']:>9,d} tokens "
              f"({meta['chars_per_token'][split]:.2f} chars/token)")
    print(f"tokenizer: vocab {meta['vocab_size']}, eos id {eos_id}")
    print(check_tokenizer_roundtrip(out, val_docs or train_docs))
    print(f"wrote {out}/ in {time.time() - t0:.1f}s")
    return meta


# --------------------------------------------------------------------------
# Data for training
# --------------------------------------------------------------------------

def load_prepared(folder: Path) -> dict:
    """Load ``train.pt``, ``val.pt`` and ``meta.json`` written by ``prepare``."""
    meta = json.loads((folder / "meta.json").read_text())
    return {
        "train": torch.load(folder / "train.pt"),
        "val": torch.load(folder / "val.pt"),
        "vocab_size": meta["vocab_size"],
        "eos_id": meta["eos_id"],
        "tokenizer_dir": folder,
        "meta": {k: v for k, v in meta.items() if k not in ("val_files", "skipped_files")},
    }


def synthetic_dataset() -> dict:
    """A tiny byte-level corpus: this script's own source code.

    Bytes are token ids 0..255 and ``<|endoftext|>`` is 256; the first 90% of
    the file is the training text, the rest the validation text.
    """
    data = list(Path(__file__).resolve().read_bytes())
    cut = int(len(data) * 0.9)
    return {
        "train": torch.tensor([256] + data[:cut] + [256], dtype=torch.int16),
        "val": torch.tensor([256] + data[cut:] + [256], dtype=torch.int16),
        "vocab_size": 257,
        "eos_id": 256,
        "tokenizer_dir": None,
        "meta": {"name": "synthetic-bytes", "source": "the bytes of train.py"},
    }


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int,
              gen: torch.Generator, device: str):
    """Sample ``batch_size`` random windows of ``seq_len + 1`` tokens (int64): each of the first ``seq_len``
    positions predicts the token after it."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long().to(device)


def eval_windows(val: torch.Tensor, seq_len: int, max_tokens: int) -> int:
    """Number of consecutive, non-overlapping windows used for validation."""
    n = (len(val) - 1) // seq_len
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // seq_len))
    return n


# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------

def ngram_baselines(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> dict:
    """Cross-entropy (nats/token) of count-based models on the ``val`` stream.

    Every token ``val[i+1]`` is predicted from ``val[i]`` (the same targets the
    network is scored on). Models are estimated on ``train``:

    * ``uniform``: ``log(vocab_size)``;
    * ``unigram``: add-one smoothed token frequencies;
    * ``bigram``: Witten-Bell interpolation of the bigram relative frequency
      with the unigram model, ``p(b|a) = (c(a,b) + T(a) p(b)) / (c(a) + T(a))``
      where ``T(a)`` is the number of distinct successors of ``a``.
    """
    tr = train.long()
    va = val.long()
    V = vocab_size
    uni_counts = torch.bincount(tr, minlength=V).double()
    p_uni = (uni_counts + 1) / (uni_counts.sum() + V)
    ctx, tgt = va[:-1], va[1:]
    unigram = -torch.log(p_uni[tgt]).mean().item()

    keys = tr[:-1] * V + tr[1:]
    uniq, counts = torch.unique(keys, return_counts=True)
    ctx_counts = torch.bincount(tr[:-1], minlength=V).double()
    n_successors = torch.bincount(uniq // V, minlength=V).double()
    vkeys = ctx * V + tgt
    pos = torch.searchsorted(uniq, vkeys).clamp(max=len(uniq) - 1)
    pair = torch.where(uniq[pos] == vkeys, counts[pos], torch.zeros_like(counts[pos])).double()
    c_a, t_a, pu = ctx_counts[ctx], n_successors[ctx], p_uni[tgt]
    p_bi = torch.where(c_a > 0, (pair + t_a * pu) / (c_a + t_a).clamp(min=1), pu)
    bigram = -torch.log(p_bi).mean().item()
    return {"uniform": math.log(V), "unigram": unigram, "bigram": bigram,
            "val_targets": len(tgt)}


# --------------------------------------------------------------------------
# Model / optimiser helpers
# --------------------------------------------------------------------------

def logits_of(output) -> torch.Tensor:
    """Accept a bare logits tensor or an output object with ``.logits``."""
    return output if torch.is_tensor(output) else output.logits


def lm_loss(model, rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) over the real vocabulary: rows[:, t] predicts rows[:, t + 1]."""
    if isinstance(model, Mamba2LMHeadModel):   # the fused loss: never holds the (tokens, vocab) logits
        return model(rows, labels=rows)
    logits = logits_of(model(rows[:, :-1]))[..., :vocab_size]
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), rows[:, 1:].reshape(-1))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups in the nanoGPT habit.

    Weight decay applies to matrices and conv kernels (``dim >= 2``) only;
    biases, norm weights, embeddings (and the tied LM head) and parameters
    flagged ``_no_weight_decay`` (A_log, D, dt_bias) are not decayed.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embedding_ids and not getattr(p, "_no_weight_decay", False):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, args) -> float:
    """Linear warmup to ``args.lr`` then cosine decay to ``args.min_lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step >= args.steps:
        return args.min_lr
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def autocast_ctx(device: str, bf16: bool):
    """bf16 autocast on the given device type, or a no-op context."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, n_windows: int, seq_len: int, batch_size: int,
             vocab_size: int, device: str, bf16: bool) -> float:
    """Mean loss over the first ``n_windows`` consecutive windows of ``val``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        starts = range(i * seq_len, min(n_windows, i + batch_size) * seq_len, seq_len)
        rows = torch.stack([val[s:s + seq_len + 1] for s in starts]).long().to(device)
        with autocast_ctx(device, bf16):
            loss = lm_loss(model, rows, vocab_size)
        total += loss.item() * rows[:, 1:].numel()
        count += rows[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model, prompt_ids: list[int], n_tokens: int, vocab_size: int, device: str,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> list[int]:
    """Sample a continuation by re-running the full forward each step (simple, slow)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        x = torch.tensor([ids], device=device)
        logits = logits_of(model(x))[0, -1, :vocab_size].float().cpu() / temperature
        kth = torch.topk(logits, min(top_k, vocab_size)).values[-1]
        logits[logits < kth] = -float("inf")
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    model.train()
    return ids[len(prompt_ids):]


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(gen: torch.Generator) -> dict:
    """All random states needed to continue a run exactly."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "batches": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, gen: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    gen.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------
# Progress, log and plot
# --------------------------------------------------------------------------

class Progress:
    """tqdm progress bar if available, else a minimal one-line bar on stderr."""

    def __init__(self, total: int, initial: int):
        self.total, self.n, self.t0, self.start = total, initial, time.time(), initial
        self.postfix, self.last_print = "", 0.0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, **postfix) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        now = time.time()
        if now - self.last_print < 1.0 and self.n < self.total:
            return
        self.last_print = now
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / max(rate, 1e-9)
        info = " ".join(f"{k}={v}" for k, v in postfix.items())
        print(f"\r{self.n}/{self.total} [{time.strftime('%H:%M:%S', time.gmtime(now - self.t0))}"
              f"<{time.strftime('%H:%M:%S', time.gmtime(eta))}] {info}", end="", file=sys.stderr)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(("\n" if self.n > self.start else "") + msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def json_safe(obj):
    """Replace non-finite floats (e.g. ``dt_limit = (0, inf)``) by strings so the log is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def plot_log(log: dict, path: Path) -> bool:
    """Draw train/val loss vs tokens seen, with n-gram baselines, to ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping loss plot")
        return False
    rows = log["history"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tr = [(r["tokens_seen"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    va = [(r["tokens_seen"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.2)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", ms=3)
    styles = {"unigram": ":", "bigram": "--"}
    for name, style in styles.items():
        if name in log.get("baselines", {}):
            value = log["baselines"][name]
            ax.axhline(value, ls=style, color="gray", lw=1)
            ax.annotate(f"{name} {value:.2f}", (0, value), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", color="gray", fontsize=8)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(log.get("title", "Mamba-2 training"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_main(argv=None) -> None:
    """``python train.py plot FOLDER``: redraw FOLDER/loss.png from train_log.json."""
    p = argparse.ArgumentParser(prog="train.py plot", description=plot_main.__doc__)
    p.add_argument("folder", help="a training output folder containing train_log.json")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if plot_log(json.loads((folder / "train_log.json").read_text()), folder / "loss.png"):
        print(f"wrote {folder / 'loss.png'}")


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

QUICK_DEFAULTS = dict(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=16,
                      seq_len=64, batch_size=8, steps=60, lr=3e-3, warmup=5,
                      eval_interval=20, log_interval=5, eval_tokens=4096, sample_tokens=0)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the training command."""
    p = argparse.ArgumentParser(
        description="Train a Mamba-2 LM from scratch with mamba2.py. "
                    "Subcommands: 'prepare' (build corpus + tokenizer), 'plot FOLDER'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help="folder written by 'train.py prepare'")
    g.add_argument("--out", help="output folder (runs/quick with --quick)")
    g.add_argument("--quick", action="store_true",
                   help="tiny model and data for a smoke test (synthetic byte data unless --data)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (no value: <out>/ckpt/ckpt.pt)")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=192, help="residual stream width")
    g.add_argument("--n-layer", type=int, default=4, help="number of Mamba-2 blocks")
    g.add_argument("--d-state", type=int, default=64, help="SSM state size N per head")
    g.add_argument("--headdim", type=int, default=32, help="channels per SSM head")
    g.add_argument("--expand", type=int, default=2, help="d_inner = expand * d_model")
    g.add_argument("--ngroups", type=int, default=1, help="groups sharing B and C")
    g.add_argument("--chunk-size", type=int, default=64,
                   help="SSD chunk length (compute tiling only; 64 is fastest on CPU here)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay of matrices (not of norms, biases, embeddings, A_log/D/dt_bias)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--seed", type=int, default=1337, help="seed of init and batch sampling")
    g.add_argument("--eval-interval", type=int, default=200, help="steps between val evaluations")
    g.add_argument("--eval-tokens", type=int, default=65536,
                   help="validation tokens per periodic evaluation (0 = the whole val split); "
                        "the final evaluation always uses the whole val split")
    g.add_argument("--log-interval", type=int, default=10, help="steps per train_log row")
    g.add_argument("--ckpt-interval", type=int, default=200, help="steps between checkpoints")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop (with a checkpoint, no export) after this many steps in this "
                        "invocation; continue later with --resume (0 = run to --steps)")
    g.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the weights written by save_pretrained")
    g.add_argument("--sample-tokens", type=int, default=128,
                   help="tokens to sample at the end as a demo (0 = none)")
    g.add_argument("--plot", action="store_true", help="write <out>/loss.png at the end")
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    """Parse training arguments; ``--quick`` fills in tiny defaults not given explicitly."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        # Options the user typed keep their value; the others get tiny defaults.
        probe = build_parser()
        for action in probe._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(probe.parse_args(argv)))
        for k, v in QUICK_DEFAULTS.items():
            if k not in given:
                setattr(args, k, v)
        args.out = args.out or "runs/quick"
    if args.out is None:
        p.error("--out is required (unless --quick)")
    if args.data is None and not args.quick:
        p.error("--data is required (unless --quick); create it with 'train.py prepare'")
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    return args


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by ``args``; return the log dictionary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt" / CKPT_NAME

    # ---- data
    if args.data:
        data = load_prepared(Path(args.data))
        if args.quick:  # a small slice keeps --quick fast on real data too
            data["train"] = data["train"][:200_000]
            data["val"] = data["val"][:20_000]
    else:
        data = synthetic_dataset()
    train_ids, val_ids, V = data["train"], data["val"], data["vocab_size"]
    n_eval = eval_windows(val_ids, args.seq_len, args.eval_tokens)
    baselines = ngram_baselines(train_ids, val_ids[:n_eval * args.seq_len + 1], V)
    print(f"data: {data['meta'].get('name')} train {len(train_ids):,} tokens, "
          f"val {len(val_ids):,} tokens ({n_eval * args.seq_len:,} scored), vocab {V}")
    print("baselines (nats/token on val): " + ", ".join(
        f"{k} {baselines[k]:.4f}" for k in ("uniform", "unigram", "bigram")))

    # ---- model and optimiser
    resume = None
    if args.resume:
        rpath = ckpt_path if args.resume == "auto" else Path(args.resume)
        if rpath.is_file():
            resume = torch.load(rpath, map_location="cpu", weights_only=False)
            print(f"resuming from {rpath} at step {resume['step']}")
        else:
            print(f"no checkpoint at {rpath}: starting from scratch")
    if resume is not None:
        config = Mamba2Config(**resume["config"])
    else:
        config = Mamba2Config(d_model=args.d_model, n_layer=args.n_layer, vocab_size=V,
                              d_state=args.d_state, headdim=args.headdim, expand=args.expand,
                              ngroups=args.ngroups, chunk_size=args.chunk_size,
                              pad_vocab_size_multiple=16, tie_embeddings=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = Mamba2LMHeadModel(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(args.beta1, args.beta2),
                                  fused=(torch.device(args.device).type == "cuda") or None)
    print(f"model: {n_params:,} parameters "
          f"({n_params * 4 / 2**20:.1f} MiB in float32), config {json.dumps(json_safe(dataclasses.asdict(config)))}")

    log = {
        "title": f"Mamba-2 {n_params / 1e6:.1f}M on {data['meta'].get('name')}",
        "data": data["meta"], "config": dataclasses.asdict(config), "args": vars(args),
        "n_params": n_params, "baselines": baselines, "history": [],
    }
    step, tokens_seen, acc, time_before = 0, 0, {"sum": 0.0, "n": 0}, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, tokens_seen, acc = resume["step"], resume["tokens_seen"], resume["acc"]
        time_before = resume.get("time_s", 0.0)
        log["history"] = resume["history"]
        restore_rng(resume["rng"], gen)
        del resume

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    model.train()
    progress = Progress(args.steps, step)
    t_start, tokens_start = time.time(), tokens_seen
    last_val = None
    if step == 0:  # the untrained model's validation loss starts the curve
        last_val = evaluate(model, val_ids, n_eval, args.seq_len, args.batch_size, V, args.device, args.bf16)
        log["history"].append({"step": 0, "tokens_seen": 0, "train_loss": None, "val_loss": last_val,
                               "lr": 0.0, "time_s": 0.0})
        progress.write(f"step      0 | val {last_val:.4f} (unigram {baselines['unigram']:.4f}, "
                       f"bigram {baselines['bigram']:.4f})")
    stop_at = min(args.steps, step + args.stop_after) if args.stop_after > 0 else args.steps
    while step < stop_at:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(args.grad_accum):
            rows = get_batch(train_ids, args.batch_size, args.seq_len, gen, args.device)
            with autocast_ctx(args.device, args.bf16):
                loss = lm_loss(model, rows, V)
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        acc["sum"] += step_loss
        acc["n"] += 1
        if not math.isfinite(step_loss):
            progress.write(f"step {step}: loss is {step_loss}, stopping")
            break

        row = None
        if step % args.log_interval == 0 or step == args.steps:
            row = {"step": step, "tokens_seen": tokens_seen,
                   "train_loss": acc["sum"] / acc["n"], "val_loss": None, "lr": lr}
            acc = {"sum": 0.0, "n": 0}
        if step % args.eval_interval == 0 or step == args.steps:
            last_val = evaluate(model, val_ids, n_eval, args.seq_len, args.batch_size, V,
                                args.device, args.bf16)
            row = row or {"step": step, "tokens_seen": tokens_seen, "train_loss": None, "lr": lr}
            row["val_loss"] = last_val
            progress.write(f"step {step:6d} | tokens {tokens_seen:,} | train {row['train_loss'] or step_loss:.4f}"
                           f" | val {last_val:.4f} (bigram {baselines['bigram']:.4f})")
        elapsed = time.time() - t_start
        if row is not None:
            row["time_s"] = round(time_before + elapsed, 2)
            log["history"].append(row)
        progress.update(loss=f"{step_loss:.3f}", tok_s=f"{(tokens_seen - tokens_start) / elapsed:,.0f}",
                        lr=f"{lr:.2e}", **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
        if step % args.ckpt_interval == 0 or step in (args.steps, stop_at):
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "tokens_seen": tokens_seen, "acc": acc,
                "time_s": time_before + elapsed,
                "config": dataclasses.asdict(config), "args": vars(args),
                "rng": rng_state(gen), "history": log["history"],
            })
    progress.close()
    elapsed = time.time() - t_start
    log["train_seconds_this_session"] = elapsed
    log["train_seconds_total"] = time_before + elapsed
    log["tokens_per_second"] = (tokens_seen - tokens_start) / max(elapsed, 1e-9)
    log["final"] = {"step": step, "tokens_seen": tokens_seen, "val_loss": last_val}
    if step == args.steps and n_eval < eval_windows(val_ids, args.seq_len, 0):
        n_full = eval_windows(val_ids, args.seq_len, 0)
        log["final"]["val_loss_full"] = evaluate(model, val_ids, n_full, args.seq_len,
                                                 args.batch_size, V, args.device, args.bf16)
        log["final"]["baselines_full"] = ngram_baselines(train_ids, val_ids[:n_full * args.seq_len + 1], V)
        print(f"final val loss on the whole val split ({n_full * args.seq_len:,} tokens): "
              f"{log['final']['val_loss_full']:.4f} (bigram {log['final']['baselines_full']['bigram']:.4f})")
    if step < args.steps:
        (out / "train_log.json").write_text(json.dumps(json_safe(log), indent=1, allow_nan=False) + "\n")
        print(f"stopped at step {step}/{args.steps}; checkpoint in {ckpt_path} (use --resume)")
        return log

    # ---- export
    export_model(model, out, args.save_dtype)
    if data["tokenizer_dir"] is not None:
        for name in TOKENIZER_FILES:
            src = Path(data["tokenizer_dir"]) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    else:
        make_byte_tokenizer(out)
    if args.sample_tokens > 0 and (out / "tokenizer.json").is_file():
        log["sample"] = demo_sample(model, out, args)
    (out / "train_log.json").write_text(json.dumps(json_safe(log), indent=1, allow_nan=False) + "\n")
    if args.plot and plot_log(log, out / "loss.png"):
        print(f"wrote {out / 'loss.png'}")
    shipped = [p for p in out.iterdir() if p.is_file()]
    print(f"saved {out}/: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(shipped))
          + f" | total {sum(p.stat().st_size for p in shipped) / 1e6:.2f} MB")
    print(f"{log['tokens_per_second']:,.0f} tokens/s over {elapsed:.0f}s; final val loss {last_val}")
    return log


def export_model(model, out: Path, save_dtype: str) -> None:
    """``save_pretrained`` into ``out``, optionally storing the weights in 16 bits."""
    dtype = getattr(torch, save_dtype)
    if dtype == torch.float32:
        model.save_pretrained(str(out))
        return
    import copy
    copy.deepcopy(model).to("cpu", dtype).save_pretrained(str(out))


def demo_sample(model, out: Path, args) -> dict:
    """Sample a short continuation of a fixed prompt and print it."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "def "
    ids = sample(model, tok.encode(prompt).ids, args.sample_tokens, tok.get_vocab_size(),
                 args.device, seed=args.seed)
    text = prompt + tok.decode(ids)
    print("---- sample ----\n" + text + "\n----------------")
    return {"prompt": prompt, "text": text}


def main(argv=None):
    """Dispatch ``prepare`` / ``plot`` subcommands, otherwise train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        return prepare(argv[1:])
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    return train(parse_train_args(argv))


if __name__ == "__main__":
    main()
