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

Several processes (one per GPU, or CPU processes with gloo)::

    torchrun --standalone --nproc_per_node 4 train.py ...           # DDP
    torchrun --standalone --nproc_per_node 4 train.py ... --fsdp    # FSDP2 fully_shard
    torchrun --standalone --nproc_per_node 4 train.py ... --context-parallel 2

``--batch-size`` is the global batch (each of the world / K data-parallel ranks reads its
share of every batch), so a run trains on the same batches, and matches one process, whatever
the number of ranks; a checkpoint holds the whole state and resumes on any number of ranks.
Rank 0 alone prints and writes files.

The subcommand ``prepare`` needs the ``tokenizers`` package; training needs
only ``torch`` and ``mamba2.py`` (``tqdm`` and ``matplotlib`` are optional).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

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
        print(f"{split:5s}: {s['files']:5d} files {s['chars']:>10,d} chars "
              f"{s['tokens']:>9,d} tokens ({meta['chars_per_token'][split]:.2f} chars/token)")
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
              gen: torch.Generator, device: str, part: slice = slice(None)):
    """Sample ``batch_size`` random windows of ``seq_len + 1`` tokens (int64): each of the first
    ``seq_len`` positions predicts the token after it.

    Every rank draws the same ``batch_size`` starts (the generator advances alike everywhere) and
    reads only the rows ``part`` of that global batch."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in starts[part].tolist()]).long().to(device)


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
# Distributed training (torchrun): data parallel (DDP or FSDP2) x context parallel
# --------------------------------------------------------------------------

def torchrun_world() -> Optional[int]:
    """``WORLD_SIZE`` when started by torchrun (``RANK`` and ``WORLD_SIZE`` set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


@dataclasses.dataclass
class Dist:
    """This process's place in the job; one plain process is rank 0 of a world of 1.

    Ranks ``[g*cp, (g+1)*cp)`` form context-parallel group ``g``: they read the same rows and
    each takes one piece of every sequence. The ``world // cp`` groups are the data-parallel
    replicas: data-parallel rank ``g`` reads rows ``[g*b, (g+1)*b)`` of each global batch.
    """
    rank: int = 0
    world: int = 1
    cp: int = 1                  # --context-parallel
    device: str = "cpu"
    fsdp: bool = False
    launched: bool = False       # by torchrun: a process group exists
    cp_group: object = None      # this rank's context-parallel process group (cp > 1)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` sequences."""
        per = batch_size // self.dp
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)

    def print(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (float64), or ``values`` as they are in one process."""
        if not self.launched:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (``value`` itself in one process)."""
        return self.sum([value])[0] / self.world if self.launched else value

    def close(self, ok: bool) -> None:
        if self.launched:
            if ok:
                dist.barrier()   # rank 0 has written everything
            dist.destroy_process_group()


def setup_distributed(args) -> Dist:
    """Join the torchrun job (gloo on CPU, nccl on CUDA; one GPU per rank, LOCAL_RANK) and form
    the context-parallel groups; without torchrun, a world of one and no process group."""
    world = torchrun_world()
    if world is None:
        return Dist(device=args.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    K, cp_group = args.context_parallel, None
    if K > 1:   # every rank creates every group, in the same order
        for first in range(0, world, K):
            group = dist.new_group(list(range(first, first + K)))
            if first <= rank < first + K:
                cp_group = group
    return Dist(rank=rank, world=world, cp=K, device=device, fsdp=args.fsdp, launched=True,
                cp_group=cp_group)


def wrap_model(model: Mamba2LMHeadModel, d: Dist) -> torch.nn.Module:
    """Under torchrun: DDP, or FSDP2 ``fully_shard`` (each block, then the root) with --fsdp,
    both over the whole world; the model itself in one process.

    Both average the gradients over all ranks. With context parallelism each rank's backward
    gives only its piece's share of the whole-sequence gradient (the sum over the group is the
    gradient), so ``train_step`` scales its loss by ``cp`` before backward: the world mean of
    ``cp * share`` is the sum over each group, averaged over the data-parallel groups. (So no
    process group of the data-parallel ranks is needed, only the context-parallel ones.)"""
    if not d.launched:
        return model
    if d.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(torch.device(d.device).type, (d.world,))
        for layer in model.backbone.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.device] if d.device.startswith("cuda") else None)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP, FSDP2)."""
    if hasattr(model, "require_backward_grad_sync"):        # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):      # FSDP2
        model.set_requires_gradient_sync(enabled)


def cp_piece(rows: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous piece of every window (group-rank order): ``seq_len / cp`` of the
    ``seq_len`` predicting positions; the last rank also holds the window's final token, which is
    only a target (as in one process, where it is the last input and predicts nothing)."""
    piece = (rows.shape[1] - 1) // d.cp
    end = (d.cp_rank + 1) * piece if d.cp_rank < d.cp - 1 else rows.shape[1]
    return rows[:, d.cp_rank * piece:end].contiguous()


def optimizer_by_index(state: dict) -> dict:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint) keyed by
    position instead, as ``Optimizer.state_dict()`` (groups list the same parameters in order)."""
    if not state:            # ranks other than 0 receive nothing with cpu_offload
        return {}
    index, groups = {}, []
    for group in state["param_groups"]:
        groups.append({**group, "params": [index.setdefault(n, len(index))
                                           for n in group["params"]]})
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def full_state(run: "Run", with_optimizer: bool = True) -> tuple[dict, dict]:
    """(model, optimizer) state, whole and in the one-process format whatever the world: the
    bare model's ``state_dict()`` and ``Optimizer.state_dict()``. Under FSDP2 every rank must call
    it (the shards are gathered to rank 0, on the CPU); elsewhere only rank 0 gets them."""
    if not run.dist.fsdp:
        return run.raw.state_dict(), run.optimizer.state_dict() if with_optimizer else {}
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(run.model, options=options)
    if not with_optimizer:
        return model_state, {}
    return model_state, optimizer_by_index(
        get_optimizer_state_dict(run.model, run.optimizer, options=options))


def load_full_state(run: "Run", model_state: dict, optimizer_state: dict) -> None:
    """Inverse of :func:`full_state`, on every rank (each has read the whole checkpoint)."""
    if not run.dist.fsdp:
        run.raw.load_state_dict(model_state)
        run.optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(run.model, model_state, options=options)
    names = {id(p): n for n, p in run.model.named_parameters()}
    order = [names[id(p)] for g in run.optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(run.model, run.optimizer, by_name, options=options)


# --------------------------------------------------------------------------
# Model / optimiser helpers
# --------------------------------------------------------------------------

def lm_loss(model, rows: torch.Tensor, d: Dist = Dist()) -> torch.Tensor:
    """Mean next-token cross-entropy over the real vocabulary (the model's fused loss, which never
    holds the logits): ``rows[:, t]`` predicts ``rows[:, t + 1]``. With context parallelism this
    rank passes its piece of the rows (as input and labels) and gets the loss of the whole rows."""
    if d.cp > 1:
        piece = cp_piece(rows, d)
        return model(piece, labels=piece, cp_group=d.cp_group)
    return model(rows, labels=rows)


def decayed_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters AdamW decays, in the nanoGPT habit: matrices and conv kernels
    (``dim >= 2``) only; not biases, norm weights, embeddings (and the tied LM head), nor
    parameters flagged ``_no_weight_decay`` (A_log, D, dt_bias)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {n for n, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in embedding_ids
            and not getattr(p, "_no_weight_decay", False)}


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decayed: Optional[set[str]] = None) -> list[dict]:
    """AdamW parameter groups: ``decayed`` (default: :func:`decayed_names`) with weight decay,
    the others without; shared parameters once. FSDP2 replaces the parameters (and drops their
    ``_no_weight_decay`` flags), so pass the names found before sharding."""
    decayed = decayed_names(model) if decayed is None else decayed
    decay, no_decay = [], []
    for name, p in model.named_parameters():      # each shared parameter once
        if p.requires_grad:
            (decay if name in decayed else no_decay).append(p)
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
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=bf16)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, n_windows: int, seq_len: int, batch_size: int,
             device: str, bf16: bool, d: Dist = Dist()) -> float:
    """Mean loss over the first ``n_windows`` consecutive windows of ``val``, ``batch_size`` at a
    time. Under torchrun the windows are dealt to the data-parallel ranks (``batch_size / dp``
    per forward) and the sums all-reduced: every rank returns the one-process number."""
    model.eval()
    mine, per = list(range(d.dp_rank, n_windows, d.dp)), batch_size // d.dp
    calls = math.ceil(math.ceil(n_windows / d.dp) / per)   # alike on all ranks: FSDP2 forwards
    total, count = 0.0, 0                                   # are collective
    for i in range(calls):
        windows = mine[i * per:(i + 1) * per]
        rows = torch.stack([val[w * seq_len:(w + 1) * seq_len + 1]
                            for w in windows or [0]]).long().to(device)
        with autocast_ctx(device, bf16):
            loss = lm_loss(model, rows, d)
        if windows:     # (a rank out of windows ran window 0 for the collectives, uncounted)
            total += loss.item() * rows[:, 1:].numel()
            count += rows[:, 1:].numel()
    # Each member of a context-parallel group holds the same whole-window sums: they count cp
    # times in both the numerator and the denominator.
    total, count = d.sum([total, count])
    model.train()
    return total / count


def sample(model: Mamba2LMHeadModel, prompt_ids: list[int], n_tokens: int,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> list[int]:
    """Sample a continuation of ``prompt_ids`` with ``model.generate`` (top-k, temperature)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(model.device).manual_seed(seed)
    prompt = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(prompt, max_new_tokens=n_tokens, do_sample=True,
                         temperature=temperature, top_k=top_k, generator=gen)
    model.train(was_training)
    return out[0, len(prompt_ids):].tolist()


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder,
    fsync, ``os.replace``, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):   # the rename itself, durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state(gen: torch.Generator) -> dict:
    """All random states needed to continue a run exactly."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "batches": gen.get_state()}
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
    """tqdm progress bar if available, else a minimal one-line bar on stderr; silent when not
    ``enabled`` (ranks other than 0)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.total, self.n, self.t0, self.start = total, initial, time.time(), initial
        self.postfix, self.last_print, self.enabled = "", 0.0, enabled
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr, disable=not enabled)
        except ImportError:
            self.bar = None

    def update(self, **postfix) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        now = time.time()
        if not self.enabled or (now - self.last_print < 1.0 and self.n < self.total):
            return
        self.last_print = now
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / max(rate, 1e-9)
        info = " ".join(f"{k}={v}" for k, v in postfix.items())
        print(f"\r{self.n}/{self.total} [{time.strftime('%H:%M:%S', time.gmtime(now - self.t0))}"
              f"<{time.strftime('%H:%M:%S', time.gmtime(eta))}] {info}", end="", file=sys.stderr)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(("\n" if self.n > self.start else "") + msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def json_safe(obj):
    """Replace non-finite floats (e.g. ``dt_limit = (0, inf)``) by strings so the log is strict
    JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_log(log: dict, out: Path) -> None:
    (out / "train_log.json").write_text(json.dumps(json_safe(log), indent=1, allow_nan=False)
                                        + "\n")
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
                    "Subcommands: 'prepare' (build corpus + tokenizer), 'plot FOLDER'. "
                    "Under 'torchrun --nproc_per_node N train.py ...' it trains on N ranks "
                    "(DDP, or FSDP2 with --fsdp; gloo on CPU, nccl on CUDA); rank 0 alone "
                    "prints and writes files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help="folder written by 'train.py prepare'")
    g.add_argument("--out", help="output folder (runs/quick with --quick)")
    g.add_argument("--quick", action="store_true",
                   help="tiny model and data for a smoke test (synthetic byte data unless --data)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (no value: <out>/ckpt/ckpt.pt); any number "
                        "of ranks can resume any checkpoint (it holds the whole state)")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=192, help="residual stream width")
    g.add_argument("--n-layer", type=int, default=4, help="number of Mamba-2 blocks")
    g.add_argument("--d-state", type=int, default=64, help="SSM state size N per head")
    g.add_argument("--headdim", type=int, default=32, help="channels per SSM head")
    g.add_argument("--expand", type=int, default=2, help="d_inner = expand * d_model")
    g.add_argument("--ngroups", type=int, default=1, help="groups sharing B and C")
    g.add_argument("--chunk-size", type=int, default=64,
                   help="SSD chunk length (compute tiling only; 64 is fastest on CPU here)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the parameters (float64: for exact comparisons)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    g.add_argument("--batch-size", type=int, default=16,
                   help="sequences per micro-batch, GLOBAL: under torchrun each data-parallel "
                        "rank takes batch-size / (world size / context-parallel) of them, so "
                        "that number must divide it; any world trains on the same batches")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None,
                   help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay of matrices (not of norms, biases, embeddings, "
                        "A_log/D/dt_bias)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on (under torchrun: cuda means cuda:LOCAL_RANK)")
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
    g.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   default="float32", help="dtype of the weights written by save_pretrained")
    g.add_argument("--sample-tokens", type=int, default=128,
                   help="tokens to sample at the end as a demo (0 = none)")
    g.add_argument("--plot", action="store_true", help="write <out>/loss.png at the end")
    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 fully_shard "
                        "instead of replicating them with DDP")
    g.add_argument("--context-parallel", type=int, default=1, metavar="K",
                   help="split every sequence over K consecutive ranks (world size = data "
                        "parallel x K; seq-len must be divisible by K)")
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    """Parse training arguments; ``--quick`` fills in tiny defaults not given explicitly.

    The layout over ranks is checked here, before any process group: a user mistake is a
    one-line ``error: ...`` and exit status 2."""
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
    world, K = torchrun_world(), args.context_parallel
    if K < 1:
        p.error(f"--context-parallel must be at least 1, got {K}")
    if world is None and (args.fsdp or K > 1):
        p.error("--fsdp and --context-parallel need several ranks: start train.py with "
                "torchrun --nproc_per_node N")
    world = world or 1
    if world % K:
        p.error(f"--context-parallel {K} must divide the world size {world}")
    if args.batch_size % (world // K):
        p.error(f"--batch-size {args.batch_size} is the global batch: it must be divisible by "
                f"the {world // K} data-parallel ranks (world size {world} / context-parallel "
                f"{K})")
    if args.seq_len % K:
        p.error(f"--seq-len {args.seq_len} must be divisible by --context-parallel {K}")
    if K > 1 and "cp_group" not in inspect.signature(Mamba2LMHeadModel.forward).parameters:
        p.error("--context-parallel > 1 needs Mamba2LMHeadModel.forward(..., cp_group=...), "
                "which this mamba2.py does not have")
    return args


@dataclasses.dataclass
class Run:
    """What the training loop reads and advances (the same on every rank)."""
    args: argparse.Namespace
    dist: Dist
    data: dict
    config: Mamba2Config
    raw: Mamba2LMHeadModel          # the model itself: evaluation, export, sampling
    model: torch.nn.Module          # what training goes through: DDP, FSDP2 or the model
    optimizer: torch.optim.Optimizer
    gen: torch.Generator            # batch sampling: the same draws on every rank
    log: dict
    n_eval: int
    step: int = 0
    tokens_seen: int = 0
    acc: dict = dataclasses.field(default_factory=lambda: {"sum": 0.0, "n": 0})
    time_before: float = 0.0        # training seconds of earlier invocations (--resume)
    t_start: float = 0.0
    tokens_start: int = 0
    last_val: Optional[float] = None

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt" / CKPT_NAME


def load_data(args) -> dict:
    """The prepared data set (a small slice of it with --quick), or the synthetic bytes."""
    if not args.data:
        return synthetic_dataset()
    data = load_prepared(Path(args.data))
    if args.quick:  # a small slice keeps --quick fast on real data too
        data["train"] = data["train"][:200_000]
        data["val"] = data["val"][:20_000]
    return data


def load_resume(args, d: Dist) -> Optional[dict]:
    """The checkpoint to resume from (read by every rank), or None."""
    if not args.resume:
        return None
    path = Path(args.out) / "ckpt" / CKPT_NAME if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        d.print(f"no checkpoint at {path}: starting from scratch")
        return None
    resume = torch.load(path, map_location="cpu", weights_only=False)
    d.print(f"resuming from {path} at step {resume['step']}")
    return resume


def setup(args, d: Dist) -> Run:
    """Data, model (wrapped for the world), optimizer and log; the resumed state if any."""
    data = load_data(args)
    train_ids, val_ids, V = data["train"], data["val"], data["vocab_size"]
    n_eval = eval_windows(val_ids, args.seq_len, args.eval_tokens)
    baselines = ngram_baselines(train_ids, val_ids[:n_eval * args.seq_len + 1], V)
    d.print(f"data: {data['meta'].get('name')} train {len(train_ids):,} tokens, "
            f"val {len(val_ids):,} tokens ({n_eval * args.seq_len:,} scored), vocab {V}")
    d.print("baselines (nats/token on val): " + ", ".join(
        f"{k} {baselines[k]:.4f}" for k in ("uniform", "unigram", "bigram")))

    resume = load_resume(args, d)
    config = Mamba2Config(**resume["config"]) if resume is not None else Mamba2Config(
        d_model=args.d_model, n_layer=args.n_layer, vocab_size=V, d_state=args.d_state,
        headdim=args.headdim, expand=args.expand, ngroups=args.ngroups,
        chunk_size=args.chunk_size, pad_vocab_size_multiple=16, tie_embeddings=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    raw = Mamba2LMHeadModel(config, dtype=getattr(torch, args.dtype)).to(d.device)
    decayed = decayed_names(raw)
    model = wrap_model(raw, d)
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay, decayed), lr=args.lr,
                                  betas=(args.beta1, args.beta2),
                                  fused=(torch.device(d.device).type == "cuda") or None)
    n_params = sum(p.numel() for p in raw.parameters())
    d.print(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB in float32), "
            f"config {json.dumps(json_safe(dataclasses.asdict(config)))}")
    if d.launched:
        d.print(f"world: {d.world} ranks ({'FSDP2' if d.fsdp else 'DDP'}, {d.dp} data parallel "
                f"x {d.cp} context parallel), {args.batch_size // d.dp} sequences per rank")
    log = {
        "title": f"Mamba-2 {n_params / 1e6:.1f}M on {data['meta'].get('name')}",
        "data": data["meta"], "config": dataclasses.asdict(config), "args": vars(args),
        "n_params": n_params, "baselines": baselines, "history": [],
    }
    run = Run(args, d, data, config, raw, model, optimizer, gen, log, n_eval)
    if resume is not None:
        load_full_state(run, resume["model"], resume["optimizer"])
        run.step, run.tokens_seen, run.acc = resume["step"], resume["tokens_seen"], resume["acc"]
        run.time_before = resume.get("time_s", 0.0)
        log["history"] = resume["history"]
        restore_rng(resume["rng"], gen)
    return run


def train_step(run: Run, lr: float) -> float:
    """One optimiser step on ``grad_accum`` global micro-batches; returns their mean loss (the
    mean over all ranks: the number one process would get)."""
    args, d = run.args, run.dist
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for micro in range(args.grad_accum):
        set_grad_sync(run.model, micro == args.grad_accum - 1)
        rows = get_batch(run.data["train"], args.batch_size, args.seq_len, run.gen, d.device,
                         d.rows(args.batch_size))
        with autocast_ctx(d.device, args.bf16):
            loss = lm_loss(run.model, rows, d)
        (loss * d.cp / args.grad_accum).backward()    # * cp: see wrap_model
        step_loss += loss.item() / args.grad_accum
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return d.mean(step_loss)     # under cp the group's ranks hold the same whole-row loss


def validate(run: Run, n_windows: Optional[int] = None) -> float:
    """The validation loss (every rank must call it), on the first ``n_windows`` windows
    (default: the --eval-tokens ones)."""
    a = run.args
    return evaluate(run.raw, run.data["val"], n_windows or run.n_eval, a.seq_len, a.batch_size,
                    run.dist.device, a.bf16, run.dist)


def save_run(run: Run, elapsed: float) -> None:
    """The checkpoint: whole model and optimizer state, RNG and log, written by rank 0."""
    model_state, optimizer_state = full_state(run)        # collective under FSDP2
    if run.dist.master:
        save_checkpoint(run.ckpt_path, {
            "model": model_state, "optimizer": optimizer_state,
            "step": run.step, "tokens_seen": run.tokens_seen, "acc": run.acc,
            "time_s": run.time_before + elapsed,
            "config": dataclasses.asdict(run.config), "args": vars(run.args),
            "rng": rng_state(run.gen), "history": run.log["history"],
        })


def train_loop(run: Run) -> None:
    """Train to --steps (or for --stop-after steps): log, evaluate and checkpoint on the way."""
    args, log = run.args, run.log
    base = log["baselines"]
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    progress = Progress(args.steps, run.step, enabled=run.dist.master)
    run.t_start, run.tokens_start = time.time(), run.tokens_seen
    if run.step == 0:  # the untrained model's validation loss starts the curve
        run.last_val = validate(run)
        log["history"].append({"step": 0, "tokens_seen": 0, "train_loss": None,
                               "val_loss": run.last_val, "lr": 0.0, "time_s": 0.0})
        progress.write(f"step      0 | val {run.last_val:.4f} (unigram {base['unigram']:.4f}, "
                       f"bigram {base['bigram']:.4f})")
    stop_at = min(args.steps, run.step + args.stop_after) if args.stop_after > 0 else args.steps
    while run.step < stop_at:
        lr = lr_at(run.step, args)
        step_loss = train_step(run, lr)
        run.step += 1
        run.tokens_seen += tokens_per_step
        run.acc["sum"] += step_loss
        run.acc["n"] += 1
        if not math.isfinite(step_loss):
            progress.write(f"step {run.step}: loss is {step_loss}, stopping")
            break

        step, row = run.step, None
        if step % args.log_interval == 0 or step == args.steps:
            row = {"step": step, "tokens_seen": run.tokens_seen,
                   "train_loss": run.acc["sum"] / run.acc["n"], "val_loss": None, "lr": lr}
            run.acc = {"sum": 0.0, "n": 0}
        if step % args.eval_interval == 0 or step == args.steps:
            run.last_val = validate(run)
            row = row or {"step": step, "tokens_seen": run.tokens_seen, "train_loss": None,
                          "lr": lr}
            row["val_loss"] = run.last_val
            progress.write(f"step {step:6d} | tokens {run.tokens_seen:,} | train "
                           f"{row['train_loss'] or step_loss:.4f} | val {run.last_val:.4f} "
                           f"(bigram {base['bigram']:.4f})")
        elapsed = time.time() - run.t_start
        if row is not None:
            row["time_s"] = round(run.time_before + elapsed, 2)
            log["history"].append(row)
        tok_s = (run.tokens_seen - run.tokens_start) / elapsed
        progress.update(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}",
                        **({"val": f"{run.last_val:.3f}"} if run.last_val is not None else {}))
        if step % args.ckpt_interval == 0 or step in (args.steps, stop_at):
            save_run(run, elapsed)
    progress.close()


def final_model(run: Run) -> Optional[Mamba2LMHeadModel]:
    """The trained model, whole, on rank 0 (under FSDP2 gathered into a copy on the CPU: every
    rank must call this); None on the other ranks."""
    if not run.dist.fsdp:
        return run.raw if run.dist.master else None
    state, _ = full_state(run, with_optimizer=False)
    if not run.dist.master:
        return None
    model = Mamba2LMHeadModel(run.config, dtype=getattr(torch, run.args.dtype))
    model.load_state_dict(state)
    return model


def finish(run: Run) -> dict:
    """After the loop: the final evaluation on the whole val split, then (at --steps) the export
    of model, tokenizer, sample, log and plot by rank 0; returns the log."""
    args, d, log, step = run.args, run.dist, run.log, run.step
    elapsed = time.time() - run.t_start
    log["train_seconds_this_session"] = elapsed
    log["train_seconds_total"] = run.time_before + elapsed
    log["tokens_per_second"] = (run.tokens_seen - run.tokens_start) / max(elapsed, 1e-9)
    log["final"] = {"step": step, "tokens_seen": run.tokens_seen, "val_loss": run.last_val}
    train_ids, val_ids = run.data["train"], run.data["val"]
    n_full = eval_windows(val_ids, args.seq_len, 0)
    if step == args.steps and run.n_eval < n_full:
        final = log["final"]
        final["val_loss_full"] = validate(run, n_full)
        final["baselines_full"] = ngram_baselines(
            train_ids, val_ids[:n_full * args.seq_len + 1], run.data["vocab_size"])
        d.print(f"final val loss on the whole val split ({n_full * args.seq_len:,} tokens): "
                f"{final['val_loss_full']:.4f} (bigram {final['baselines_full']['bigram']:.4f})")
    out = run.out
    if step < args.steps:
        if d.master:
            write_log(log, out)
        d.print(f"stopped at step {step}/{args.steps}; checkpoint in {run.ckpt_path} "
                f"(use --resume)")
        return log
    model = final_model(run)
    if d.master:
        export(run, model)
        d.print(f"{log['tokens_per_second']:,.0f} tokens/s over {elapsed:.0f}s; "
                f"final val loss {run.last_val}")
    return log


def export(run: Run, model: Mamba2LMHeadModel) -> None:
    """Rank 0: save_pretrained, the tokenizer files, the demo sample, train_log.json, loss.png."""
    args, data, out, log = run.args, run.data, run.out, run.log
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
    write_log(log, out)
    if args.plot and plot_log(log, out / "loss.png"):
        print(f"wrote {out / 'loss.png'}")
    shipped = sorted(p for p in out.iterdir() if p.is_file())
    print(f"saved {out}/: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB"
                                        for p in shipped)
          + f" | total {sum(p.stat().st_size for p in shipped) / 1e6:.2f} MB")


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by ``args``; return the log dictionary (on every rank)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    d = setup_distributed(args)
    ok = False
    try:
        if d.master:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        run = setup(args, d)
        train_loop(run)
        log = finish(run)
        ok = True
        return log
    finally:
        d.close(ok)


def export_model(model, out: Path, save_dtype: str) -> None:
    """``save_pretrained`` into ``out`` (atomic), the weights in ``save_dtype``."""
    dtype = getattr(torch, save_dtype)
    if dtype == model.dtype:
        model.save_pretrained(str(out))
        return
    import copy
    copy.deepcopy(model).to("cpu", dtype).save_pretrained(str(out))


def demo_sample(model, out: Path, args) -> dict:
    """Sample a short continuation of a fixed prompt and print it."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "def "
    ids = sample(model, tok.encode(prompt).ids, args.sample_tokens, seed=args.seed)
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
