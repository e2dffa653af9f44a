"""
bench.py — what mamba2.py costs, against a floor and against transformers, on this machine.

    python bench.py                       # everything, mamba2-130m shapes (~15 minutes on 2 cores)
    python bench.py --only block,decode   # some sections
    python bench.py --quick               # tiny shapes, 2 repetitions, < 30 s: a smoke test
    python bench.py --device cuda --dtype bfloat16 --threads 8 --out assets

How it measures. Every figure is wall-clock time (time.perf_counter) taken in this one run, after
warm-up, with torch.set_num_threads(--threads), in --dtype (float32 unless stated), batch 1 unless
stated. The candidates of one comparison (say ours, the floor and transformers at one length) run
*interleaved*: each round runs every candidate once, in a fresh random order, for --reps rounds
(three times as many for comparisons whose round takes well under a second). A time is the median
over rounds; a ratio is the median over rounds of the two times taken in the same round. On a
shared machine whose speed drifts by tens of percent from one minute to the next (this project's
2-core VM does), same-round ratios stay put where ratios of separately taken medians do not.
Shapes are those of mamba2-130m: d_model 768, d_state 128, headdim 64, expand 2, ngroups 1 (24
heads), 24 layers, vocabulary 50277 (padded to 50288). Weights are random: speed and memory do not
depend on their values.

Sections (--only takes their names):
  block    one Mamba2 block forward (no_grad) at several lengths: ours; the floor, which is the
           block's own in_proj and out_proj matrix products alone on inputs of the same length
           (every implementation must do them, so ours/floor >= 1 and the excess is the cost of
           conv, scan, norm and glue); and transformers' pure-PyTorch Mamba2Mixer with the same
           weights (skipped where it would need > 12 GB). "speedup" = transformers time / ours.
           "scaling" = tokens/s at the longest length / tokens/s at 2048, both timed in the same
           rounds (1.0 is perfectly linear; the target is >= 0.85).
  memory   peak memory of one block forward vs length. On CPU each point runs in a fresh
           subprocess (python bench.py --_memory_point ...) and reports the growth of the peak
           resident set size during the forward: the high-water mark after minus before, the mark
           first reset through /proc/self/clear_refs so that earlier peaks (model construction,
           the warm-up) cannot hide it. It is read as VmHWM from /proc/self/status, which is what
           ru_maxrss reports too, except that ru_maxrss of a subprocess also carries its parent's
           peak (see peak_rss_kib); ru_maxrss is the fallback where /proc is missing. On CUDA:
           torch.cuda.max_memory_allocated minus what was allocated before the forward.
  decode   the 24-layer language model, one token per step through the inference cache, at batch
           1, 8 and 32. The floor is the same matrix-vector products alone (in_proj and out_proj of
           every layer plus the LM head); "floor + state" adds one read and one write of every
           layer's SSM state, which any recurrent step must do and which the floor leaves out.
           The step is generate's (model._decode); "compiled" is generate(compile=True)'s, timed
           after its compilation (whose seconds are reported apart).
           Then end-to-end greedy generation at batch 1 and 8, ours generate() vs transformers'
           Mamba2ForCausalLM.generate() with the same weights (tokens/s, both including their
           prefill), and the step time after contexts of growing length (a recurrent model: it
           should be flat).
  train    forward + backward of a 4-layer LM at 2048 tokens through each library's training
           call, model(ids, labels=ids): ours with use_mem_eff_path True (each block recomputed
           in backward) and False, and transformers' Mamba2ForCausalLM; ours also with the loss
           taken on returned logits. Then the 4 Mamba-2 layers alone (backbone forward +
           backward, no embedding lookup or LM head). Memory: bytes of the tensors saved for
           backward (unique storages, parameters excluded, via
           torch.autograd.graph.saved_tensors_hooks) and the peak RSS growth of a step in a
           subprocess (CPU) or peak CUDA memory.
  bf16     block forward at 2048, the decode step and the training step in bfloat16 (weights and
           inputs, or autocast for training) against float32, same rounds.
  compile  torch.compile(block) vs eager at 2048: max abs difference, time, compile time, and the
           number of graph breaks torch._dynamo.explain finds.
  chunk    block forward at 2048 over a grid of chunk lengths (mamba2.CHUNK_LEN_CAP and
           chunk_size) and sequence block lengths (mamba2.SPAN_LEN), the defaults marked with *.
  context  context parallelism (cp_group): one training step of a 4-layer model of the 130m
           shapes (vocabulary 512: the layers are the point) on one 65,536-token sequence split
           over K = 1, 2, 4 gloo processes on this machine: step time and peak memory per rank.

Reading the ratios: "x floor" above 1 is time spent outside the big matrix products (lower is
better, 1.0 is the best any implementation can do); "speedup" and "vs transformers" above 1 mean
ours is faster; "mem-eff/plain" below 1 means the memory-efficient path saves memory (and its time
ratio, usually a bit above 1, is the price of recomputation).

Outputs (under --out): throughput.png, memory.png, decode_latency.png, bench.json (every raw
time), bench.md (the summary table printed at the end, ready to paste into README).

--quick checks that every section runs, not what it measures: d_model 64, lengths up to 2048, 2
repetitions, 1 thread (2 threads on a busy 2-core machine can be 100x slower from OpenMP
contention), torch.compile with backend "eager" (inductor's C++ build alone takes longer than the
whole run), each section's memory points measured in one subprocess rather than one each, and
transformers left out of the memory subprocesses (importing it costs seconds). Give it --out
elsewhere to keep real results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import mamba2
from mamba2 import Mamba2, Mamba2Config, Mamba2LMHeadModel

SECTIONS = ("block", "memory", "decode", "train", "bf16", "compile", "chunk", "context")
HF_LIMIT_BYTES = 12e9          # skip transformers where its block forward would need more than this


# ============================================================================================ sizes

@dataclass
class Shapes:
    """Model shapes and the lengths each section runs at (full: mamba2-130m; quick: tiny)."""
    d_model: int = 768
    d_state: int = 128
    headdim: int = 64
    n_layer: int = 24
    vocab: int = 50277
    block_lengths: list = field(default_factory=lambda: [512, 2048, 8192])
    long_length: int = 65536               # ours only
    ref_length: int = 2048                 # the length "scaling" and the single-length sections use
    memory_lengths: list = field(default_factory=lambda: [2048, 8192, 32768])
    memory_long: int = 65536               # ours only
    decode_batches: list = field(default_factory=lambda: [1, 8, 32])
    gen_batches: list = field(default_factory=lambda: [1, 8])
    prompt_len: int = 16
    new_tokens: int = 32
    contexts: list = field(default_factory=lambda: [128, 1024, 8192])
    train_layers: int = 4
    train_len: int = 2048
    chunk_sizes: list = field(default_factory=lambda: [32, 64, 128, 256])
    seq_blocks: list = field(default_factory=lambda: [256, 512, 1024, 2048])
    step_inner: int = 10                   # decode steps averaged into one timing sample
    cp_length: int = 65536                 # context parallelism: one sequence over K ranks
    cp_layers: int = 4
    cp_vocab: int = 512                    # small: the point is the layers, not the head
    cp_ranks: list = field(default_factory=lambda: [1, 2, 4])

    @property
    def d_inner(self) -> int:
        return 2 * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim


QUICK = Shapes(d_model=64, d_state=16, headdim=16, n_layer=2, vocab=512, block_lengths=[64, 256],
               long_length=1024, ref_length=256, memory_lengths=[256, 1024], memory_long=2048,
               decode_batches=[1, 8], prompt_len=8, new_tokens=8, contexts=[16, 128, 512],
               train_layers=2, train_len=256, chunk_sizes=[32, 64], seq_blocks=[128, 256],
               step_inner=4, cp_length=1024, cp_layers=2, cp_ranks=[1, 2])


def block_config(S: Shapes, **kw) -> Mamba2Config:
    return Mamba2Config(d_model=S.d_model, d_state=S.d_state, headdim=S.headdim, **kw)


def lm_config(S: Shapes, n_layer: int, **kw) -> Mamba2Config:
    return Mamba2Config(d_model=S.d_model, d_state=S.d_state, headdim=S.headdim, n_layer=n_layer,
                        vocab_size=S.vocab, **kw)


# ==================================================================================== transformers

def hf_config(S: Shapes, n_layer: int, padded_vocab: int = 0, chunk_size: int = 256):
    """A transformers Mamba2Config with our shapes (tied embeddings, fp32 residual and eps 1e-5,
    as ours)."""
    from transformers import Mamba2Config as HFConfig
    from transformers.utils import logging
    # quiet its "falling back to the reference PyTorch implementation" notes
    logging.set_verbosity_error()
    return HFConfig(hidden_size=S.d_model, num_hidden_layers=n_layer, num_heads=S.nheads,
                    head_dim=S.headdim, n_groups=1, state_size=S.d_state, expand=2,
                    chunk_size=chunk_size, vocab_size=padded_vocab or 16, tie_word_embeddings=True,
                    residual_in_fp32=True, layer_norm_epsilon=1e-5)


def hf_mixer(block: Mamba2, S: Shapes):
    """transformers' Mamba2Mixer holding `block`'s weights (same parameter names), eval mode."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    mixer = Mamba2Mixer(hf_config(S, 1), layer_idx=0)
    mixer.load_state_dict(block.state_dict())
    w = block.in_proj.weight
    return mixer.to(device=w.device, dtype=w.dtype).eval()


def hf_lm(model: Mamba2LMHeadModel, S: Shapes, n_layer: int):
    """transformers' Mamba2ForCausalLM holding `model`'s weights (only the embedding is renamed)."""
    from transformers import Mamba2ForCausalLM
    hf = Mamba2ForCausalLM(hf_config(S, n_layer, padded_vocab=model.config.padded_vocab_size))
    state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
             for k, v in model.state_dict().items()}
    hf.load_state_dict(state)
    hf.tie_weights()
    return hf.to(device=model.device, dtype=model.dtype)


def hf_block_bytes(length: int, S: Shapes, dtype_bytes: int = 4, q: int = 256) -> float:
    """A generous estimate of transformers' block forward memory: its chunk scan keeps about six
    (chunks, q, q, heads) fp32 tensors alive at once (segment sums, decay, C·Bᵀ, masked scores)
    plus the (length, channels) projections and activations."""
    padded = -(-length // q) * q
    quadratic = 6 * padded * q * S.nheads * 4
    d_in_proj = 2 * S.d_inner + 2 * S.d_state + S.nheads
    linear = 8 * padded * (d_in_proj + S.d_inner) * max(dtype_bytes, 4)
    return quadratic + linear


# ========================================================================================== timing

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(fns: dict, reps: int, device: torch.device, warmup: int = 1,
               inner: dict = None) -> dict:
    """Time several candidates under the same conditions: each of `reps` rounds runs every
    candidate once (the mean of inner[name] calls), in a fresh random order. Returns
    {name: {"median_s", "times_s", "inner"}}; see `ratio` for comparing two of them."""
    inner = inner or {}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            n = inner.get(name, 1)
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / n)
    return {name: {"median_s": statistics.median(t), "times_s": t, "inner": inner.get(name, 1)}
            for name, t in times.items()}


def ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time in the same round (a and b: two results of one
    `interleave` call)."""
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))


def ms(t: dict) -> float:
    return t["median_s"] * 1e3


def fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def print_table(title: str, headers: list, rows: list):
    cells = [[str(h) for h in headers]]
    cells += [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def err_text(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


# ====================================================================================== the machine

def machine_info(args, device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(),
        "cores_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device), "dtype": args.dtype, "isa": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    # transformers' Mamba2Mixer swaps in these packages' kernels when they are installed (CUDA only)
    info["transformers_kernels_installed"] = [m for m in ("mamba_ssm", "causal_conv1d")
                                              if importlib.util.find_spec(m) is not None]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ===================================================================================== the context

class Bench:
    """What every section needs: options, device, dtype, shapes, and where the results and the
    summary rows go."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.S = QUICK if args.quick else Shapes()
        self.reps = args.reps
        self.out = Path(args.out)
        self.results: dict = {}
        self.summary: list = []          # (section, what, value) rows of the final markdown table
        self.extra_md: list = []         # further markdown blocks (the chunk grid)

    def interleave(self, fns: dict, warmup=1, inner=None, cheap=False) -> dict:
        """`reps` rounds, or three times as many for a comparison whose round takes well under a
        second (the noise of a shared machine is averaged out at little cost)."""
        return interleave(fns, self.reps * (3 if cheap else 1), self.device, warmup, inner)

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype)

    def block(self, **kw) -> Mamba2:
        torch.manual_seed(0)
        return Mamba2(block_config(self.S, **kw)).to(self.device, self.dtype).eval()

    def lm(self, n_layer: int, **kw) -> Mamba2LMHeadModel:
        torch.manual_seed(0)
        model = Mamba2LMHeadModel(lm_config(self.S, n_layer, **kw))
        return model.to(self.device, self.dtype).eval()

    def ids(self, b: int, l: int, vocab: int = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(b * 100003 + l)
        return torch.randint(0, vocab or self.S.vocab, (b, l), generator=g).to(self.device)

    def add(self, section: str, what: str, value: str):
        self.summary.append((section, what, value))


# ======================================================================================= 1. block

def bench_block(B: Bench):
    S = B.S
    block = B.block()
    w_in, w_out = block.in_proj.weight, block.out_proj.weight
    try:
        hf = hf_mixer(block, S)
    except Exception as e:           # transformers missing or incompatible: ours and the floor only
        hf, hf_error = None, err_text(e)
    rows, points = [], []
    lengths = S.block_lengths + [S.long_length]
    scaling = None
    with torch.no_grad():
        diff = None
        if hf is not None:           # same weights, so the same output up to rounding
            u = B.randn(1, S.ref_length, S.d_model)
            diff = (block(u) - hf(u)).abs().max().item()
        for L in lengths:
            u = B.randn(1, L, S.d_model)
            y = B.randn(1, L, S.d_inner)
            fns = {"floor": lambda: (F.linear(u, w_in), F.linear(y, w_out)),
                   "ours": lambda: block(u)}
            inner = {}
            note = None
            if L == S.long_length:
                note = "ours only"
                u_ref = B.randn(1, S.ref_length, S.d_model)
                # the same number of tokens, in the same rounds
                fns["ours at ref"] = lambda: block(u_ref)
                inner["ours at ref"] = L // S.ref_length
            elif hf is None:
                note = f"transformers unavailable: {hf_error}"
            elif hf_block_bytes(L, S, B.dtype.itemsize) > HF_LIMIT_BYTES:
                note = f"transformers skipped: needs > {HF_LIMIT_BYTES / 1e9:.0f} GB"
            else:
                fns["transformers"] = lambda: hf(u)
            try:
                res = B.interleave(fns, inner=inner, cheap=L <= S.ref_length)
            except (MemoryError, RuntimeError) as e:
                if "transformers" not in fns:
                    raise
                note = f"transformers failed: {err_text(e, 120)}"
                fns.pop("transformers")
                res = B.interleave(fns, inner=inner, cheap=L <= S.ref_length)
            ours, floor, theirs = res["ours"], res["floor"], res.get("transformers")
            # tokens/s at L over tokens/s at ref (times are per call), same rounds
            if "ours at ref" in res:
                scaling = ratio(res["ours at ref"], ours) * L / S.ref_length
            u = y = None   # free the inputs (not `del`: the lambdas above refer to u and y)
            p = {"length": L, "ours": ours, "floor": floor, "transformers": theirs, "note": note,
                 "ours_tokens_per_s": L / ours["median_s"],
                 "floor_tokens_per_s": L / floor["median_s"],
                 "transformers_tokens_per_s": L / theirs["median_s"] if theirs else None,
                 "ours_over_floor": ratio(ours, floor),
                 "speedup_vs_transformers": ratio(theirs, ours) if theirs else None}
            points.append(p)
            rows.append([L, ms(ours), p["ours_tokens_per_s"], ms(floor), p["ours_over_floor"],
                         ms(theirs) if theirs else None, p["speedup_vs_transformers"]])
    by_len = {p["length"]: p for p in points}
    B.results["block"] = {"points": points, "scaling_long_vs_ref": scaling,
                          "max_abs_diff_vs_transformers": diff,
                          "long_length": S.long_length, "ref_length": S.ref_length}
    print_table("block forward (no_grad); ratios are medians of same-round ratios",
                ["length", "ours ms", "ours tok/s", "floor ms", "x floor", "transformers ms",
                 "speedup"], rows)
    print(f"  scaling: tokens/s at {S.long_length} / at {S.ref_length} = {scaling:.2f} "
          f"(linear = 1, target >= 0.85)")
    if diff is not None:
        print(f"  max |ours - transformers| at {S.ref_length}: {diff:.2e} (same weights)")
    ref = by_len[S.ref_length]
    B.add("block", f"forward at {S.ref_length} tokens",
          f"{ms(ref['ours']):.1f} ms ({ref['ours_tokens_per_s']:,.0f} tok/s)")
    for p in points:
        B.add("block", f"ours / floor (in_proj + out_proj alone) at {p['length']}",
              f"{p['ours_over_floor']:.2f}x")
    for p in points:
        if p["speedup_vs_transformers"]:
            B.add("block", f"speedup vs transformers at {p['length']}",
                  f"{p['speedup_vs_transformers']:.2f}x")
    B.add("block", f"tokens/s at {S.long_length} / at {S.ref_length}", f"{scaling:.2f}")
    plot_throughput(B, points)


def length_axis(ax, lengths: list, label: str):
    """Log-2 x axis ticked at the measured lengths, written out (2,048 rather than 2^11)."""
    import matplotlib.ticker as ticker
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(lengths)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(label)


def plot_throughput(B: Bench, points: list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    L = [p["length"] for p in points]
    ax.plot(L, [p["ours_tokens_per_s"] for p in points], "o-", label="mamba2.py")
    ax.plot(L, [p["floor_tokens_per_s"] for p in points], "k--", alpha=0.5,
            label="floor: in_proj + out_proj only")
    hf = [(p["length"], p["transformers_tokens_per_s"]) for p in points
          if p["transformers_tokens_per_s"]]
    if hf:
        ax.plot(*zip(*hf), "s-", label="transformers Mamba2Mixer")
    length_axis(ax, L, "sequence length (tokens)")
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (block forward)")
    ax.set_title(f"Mamba-2 block, d_model {B.S.d_model}, {B.args.dtype}, {B.args.threads} threads, "
                 f"{B.device.type}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(B.out / "throughput.png", dpi=120)
    plt.close(fig)


# ====================================================================================== 2. memory

def peak_rss_reset() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> tuple:
    """(high-water mark of the resident set in KiB, where it was read).

    VmHWM from /proc/self/status where there is one: it belongs to this process's own address space
    and peak_rss_reset() resets it. ru_maxrss is the same figure on Linux but is also raised to the
    peak of the *parent* when this process was started through vfork + exec (as subprocess does),
    which can hide every peak below the parent's; it is the fallback elsewhere (KiB on Linux, bytes
    on macOS).
    """
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if m:
            return int(m.group(1)), "VmHWM"
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r / 1024 if sys.platform == "darwin" else r), "ru_maxrss"


def memory_point(spec: dict) -> dict:
    """Runs in a subprocess: one block forward ("block") or one training step ("train") at one
    length, after a short warm-up at 64 tokens, and the growth of peak memory it causes, in MB."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    S = Shapes(**spec["shapes"])
    L = spec["length"]
    torch.manual_seed(0)
    if spec["what"] == "block":
        block = Mamba2(block_config(S)).to(device, dtype).eval()
        model = hf_mixer(block, S) if spec["impl"] == "transformers" else block
        u = torch.randn(1, L, S.d_model, device=device, dtype=dtype)

        def run():
            with torch.no_grad():
                return model(u)

        def warm():
            with torch.no_grad():
                model(u[:, :64])
    else:
        ours = Mamba2LMHeadModel(lm_config(S, S.train_layers,
                                           use_mem_eff_path=spec.get("mem_eff", True)))
        ours = ours.to(device, dtype)
        model = (hf_lm(ours, S, S.train_layers) if spec["impl"] == "transformers" else ours).train()
        ids = torch.randint(0, S.vocab, (1, L), device=device)

        def run():
            return train_step(model, ids)

        def warm():
            train_step(model, ids[:, :64])
            model.zero_grad(set_to_none=True)   # the measured step allocates its gradients afresh
    warm()
    gc.collect()
    out = {"length": L}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = run()
        sync(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["method"] = "torch.cuda.max_memory_allocated - allocated before"
    else:
        reset = peak_rss_reset()
        before, source = peak_rss_kib()
        result = run()
        after, _ = peak_rss_kib()
        out["peak_mb"] = (after - before) / 1024
        out["method"] = (f"peak RSS ({source}) after - before"
                         + ("" if reset else ", high-water mark not reset"))
    del result
    return out


def run_memory_points(B: Bench, specs: list) -> list:
    """Measure each spec in its own fresh `python bench.py --_memory_point` process, one after the
    other, so that no point inherits memory another one left mapped. --quick measures all of a
    section's points in one process (fewer interpreter start-ups; its numbers are only a smoke test
    anyway)."""
    base = {"device": B.args.device, "dtype": B.args.dtype, "threads": B.args.threads,
            "shapes": asdict(B.S)}
    timeout = 300 if B.args.quick else 1800
    groups = [specs] if B.args.quick else [[s] for s in specs]
    results = []
    for group in groups:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory_point",
               json.dumps([{**base, **s} for s in group])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
            failure = None
            if proc.returncode:
                tail = (proc.stderr.strip().splitlines() or [""])[-1]
                failure = f"exit {proc.returncode}: " + (
                    "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[:200])
        except subprocess.TimeoutExpired:
            lines, failure = [], f"timed out after {timeout} s"
        # a crash loses the point it happened in and those after it
        for i, spec in enumerate(group):
            results.append({**spec, **lines[i]} if i < len(lines)
                           else {**spec, "peak_mb": None, "error": failure})
    return results


def mb_or_error(point: dict):
    if not point:
        return "—"
    return point["peak_mb"] if point.get("peak_mb") is not None else point.get("error", "—")


def bench_memory(B: Bench):
    S = B.S
    specs = [{"what": "block", "impl": "ours", "length": L}
             for L in S.memory_lengths + [S.memory_long]]
    skipped = []
    for L in S.memory_lengths:
        est = hf_block_bytes(L, S, B.dtype.itemsize)
        # --quick keeps the subprocess from importing transformers (seconds); "block" tests hf_mixer
        if B.args.quick:
            skipped.append({"what": "block", "impl": "transformers", "length": L, "peak_mb": None,
                            "error": "skipped with --quick"})
        elif est > HF_LIMIT_BYTES:
            skipped.append({"what": "block", "impl": "transformers", "length": L, "peak_mb": None,
                            "error": f"skipped: estimated {est / 1e9:.1f} GB "
                                     f"> {HF_LIMIT_BYTES / 1e9:.0f} GB"})
        else:
            specs.append({"what": "block", "impl": "transformers", "length": L,
                          "estimate_mb": est / 2**20})
    points = run_memory_points(B, specs) + skipped
    B.results["memory"] = {"points": points}
    rows = []
    for L in S.memory_lengths + [S.memory_long]:
        o = next((p for p in points if p["impl"] == "ours" and p["length"] == L), {})
        t = next((p for p in points if p["impl"] == "transformers" and p["length"] == L), {})
        ratio = t["peak_mb"] / o["peak_mb"] if t.get("peak_mb") and o.get("peak_mb") else None
        rows.append([L, mb_or_error(o), mb_or_error(t), ratio])
        if o.get("peak_mb") is not None:
            B.add("memory", f"block forward peak at {L} tokens", f"{o['peak_mb']:.0f} MB" + (
                f" (transformers {t['peak_mb']:.0f} MB)" if t.get("peak_mb") is not None else ""))
    method = next((p.get("method") for p in points if p.get("method")), "")
    print_table(f"block forward peak memory, MB ({method})",
                ["length", "ours", "transformers", "theirs/ours"], rows)
    for p in points:
        if p.get("error") and not p["error"].startswith("skipped"):   # a crash or a timeout
            print(f"  {p['impl']} at {p['length']}: {p['error']}")
    plot_memory(B, points)


def plot_memory(B: Bench, points: list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, style, label in (("ours", "o-", "mamba2.py"),
                               ("transformers", "s-", "transformers Mamba2Mixer")):
        # log axes: positive values only
        pts = sorted((p["length"], p["peak_mb"]) for p in points
                     if p["impl"] == impl and (p.get("peak_mb") or 0) > 0)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    length_axis(ax, [p["length"] for p in points], "sequence length (tokens)")
    ax.set_yscale("log")
    ax.set_ylabel("peak memory growth of a forward (MB)")
    ax.set_title(f"Mamba-2 block, d_model {B.S.d_model}, {B.args.dtype}, {B.device.type}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(B.out / "memory.png", dpi=120)
    plt.close(fig)


# ====================================================================================== 3. decode

def decode_step(B: Bench, model: Mamba2LMHeadModel, batch: int, context: int,
                compiled: bool = False):
    """A function taking one decoding step after a `context`-token prefill into a fresh cache:
    generate's own step (model._decode: no checks, no host synchronisation; forward(cache=)
    adds the input checks), or with `compiled` the step of generate(compile=True), compiled on
    its first call. The step's appended key and value are dropped again, so that an attention
    layer's context stays `context` over the repetitions."""
    cache = model.allocate_inference_cache(batch, max_seqlen=context + 1)
    model(B.ids(batch, context), cache=cache, num_last_tokens=1)
    token = B.ids(batch, 1)[:, 0]                                               # (b,)
    attention = [c for c in cache if isinstance(c, mamba2.AttentionCache)]
    decode = mamba2._compiled_decode(model) if compiled else model._decode

    def step():
        decode(token, cache)
        for c in attention:
            c.length = context
    return step


def hybrid_lm(B: Bench) -> Mamba2LMHeadModel:
    """The decode model with every sixth layer attention (as mamba2attn-2.7b has 6 of 64 layers):
    heads of 64 channels, rotary on half of them, a conv of width 4, no biases."""
    S = B.S
    every = max(2, S.n_layer // 4)
    heads = S.d_model // S.headdim
    attn_cfg = dict(num_heads=heads, head_dim=S.headdim, rotary_emb_dim=S.headdim // 2,
                    causal=True, d_conv=4, qkv_proj_bias=False, out_proj_bias=False)
    return B.lm(S.n_layer, attn_layer_idx=list(range(every - 1, S.n_layer, every)),
                attn_cfg=attn_cfg)


def matvec_floor(B: Bench, model: Mamba2LMHeadModel, batch: int, with_state: bool = False):
    """The decode step's unavoidable work: every layer's in_proj and out_proj on one token, plus the
    LM head; with_state, also one read and one write of every layer's SSM state (an in-place
    scaling), the least any recurrent step must move."""
    S = B.S
    x_in, x_out = B.randn(batch, 1, S.d_model), B.randn(batch, 1, S.d_inner)
    weights = [(l.mixer.in_proj.weight, l.mixer.out_proj.weight) for l in model.backbone.layers]
    head = model.lm_head.weight
    states = [B.randn(batch, S.nheads, S.headdim, S.d_state) if with_state else None
              for _ in weights]
    decay = torch.full((batch, S.nheads, 1, 1), 0.999, device=B.device, dtype=B.dtype)

    def run():
        for (w_in, w_out), state in zip(weights, states):
            F.linear(x_in, w_in)
            if state is not None:
                state.mul_(decay)
            F.linear(x_out, w_out)
        F.linear(x_in, head)
    return run


def generate_vs_transformers(B: Bench, model, b: int) -> dict:
    """Greedy generate() of ours (eager, and compile=True after its compilation, which the
    warm-up round does) and transformers' on the same weights and prompts, batch b."""
    S = B.S
    ids = B.ids(b, S.prompt_len)
    N = S.new_tokens
    gen = {"batch": b, "prompt_len": S.prompt_len, "new_tokens": N}
    out = {}
    fns = {"ours": lambda: out.__setitem__("ours", model.generate(ids, max_new_tokens=N)),
           "compiled": lambda: out.__setitem__("compiled", model.generate(
               ids, max_new_tokens=N, compile=True))}
    try:
        hf = hf_lm(model, S, S.n_layer).eval()
        mask = torch.ones_like(ids)
        fns["transformers"] = lambda: out.__setitem__("transformers", hf.generate(
            ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
            pad_token_id=0))
    except Exception as e:
        gen["transformers_error"] = err_text(e)
    t = B.interleave(fns)
    gen["ours"] = t["ours"]
    gen["ours_tokens_per_s"] = b * N / t["ours"]["median_s"]
    gen["compiled"] = t["compiled"]
    gen["compiled_tokens_per_s"] = b * N / t["compiled"]["median_s"]
    gen["compiled_same_tokens"] = bool(torch.equal(out["compiled"], out["ours"]))
    if "transformers" in t:
        gen["transformers"] = t["transformers"]
        gen["transformers_tokens_per_s"] = b * N / t["transformers"]["median_s"]
        gen["speedup_vs_transformers"] = ratio(t["transformers"], t["ours"])
        # a check that both hold the same weights; ours picks among the vocab_size real tokens
        # only, transformers among all padded_vocab_size rows, so a rare argmax in the padding
        # can differ
        gen["same_tokens"] = bool(torch.equal(out["transformers"].cpu(), out["ours"].cpu()))
        gen["compiled_speedup_vs_transformers"] = ratio(t["transformers"], t["compiled"])
    print_table(f"generate(): {S.prompt_len}-token prompt + {N} new tokens, greedy, batch {b}",
                ["", "ms", "new tok/s", "speedup", "same tokens"],
                [["ours", ms(gen["ours"]), gen["ours_tokens_per_s"], None, None],
                 ["ours, compile=True", ms(gen["compiled"]), gen["compiled_tokens_per_s"], None,
                  f"{gen['compiled_same_tokens']} (as ours)"],
                 ["transformers",
                  (ms(gen["transformers"]) if "transformers" in gen
                   else gen.get("transformers_error")),
                  gen.get("transformers_tokens_per_s"), gen.get("speedup_vs_transformers"),
                  str(gen.get("same_tokens", "—"))]])
    B.add("decode", f"generate {N} tokens, batch {b}",
          f"{gen['ours_tokens_per_s']:,.0f} tok/s, compiled {gen['compiled_tokens_per_s']:,.0f}"
          + (f" vs transformers {gen['transformers_tokens_per_s']:,.0f} tok/s "
             f"({gen['speedup_vs_transformers']:.2f}x, compiled "
             f"{gen['compiled_speedup_vs_transformers']:.2f}x)" if "transformers" in gen else ""))
    return gen


def bench_decode(B: Bench):
    S = B.S
    model = B.lm(S.n_layer)
    res = {"steps": [], "contexts": []}
    rows = []
    with torch.inference_mode():
        for b in S.decode_batches:
            t0 = time.perf_counter()
            compiled = decode_step(B, model, b, S.prompt_len, compiled=True)
            compiled()                                     # compiles (not part of the timings)
            compile_s = time.perf_counter() - t0
            fns = {"step": decode_step(B, model, b, S.prompt_len), "compiled": compiled,
                   "floor": matvec_floor(B, model, b),
                   "floor + state": matvec_floor(B, model, b, with_state=True)}
            t = B.interleave(fns, warmup=3, cheap=True, inner={k: S.step_inner for k in fns})
            p = {"batch": b, "step": t["step"], "compiled_step": t["compiled"],
                 "compile_s": compile_s, "floor": t["floor"],
                 "floor_with_state": t["floor + state"],
                 "step_over_floor": ratio(t["step"], t["floor"]),
                 "step_over_floor_with_state": ratio(t["step"], t["floor + state"]),
                 "compiled_over_floor_with_state": ratio(t["compiled"], t["floor + state"]),
                 "tokens_per_s": b / t["step"]["median_s"]}
            res["steps"].append(p)
            rows.append([b, ms(p["step"]), p["tokens_per_s"], ms(p["floor"]), p["step_over_floor"],
                         ms(p["floor_with_state"]), p["step_over_floor_with_state"],
                         ms(p["compiled_step"]), p["compiled_over_floor_with_state"], compile_s])
            B.add("decode", f"step, batch {b}",
                  f"{ms(p['step']):.2f} ms = {p['step_over_floor']:.2f}x floor, "
                  f"{p['step_over_floor_with_state']:.2f}x floor + state "
                  f"({p['tokens_per_s']:,.0f} tok/s); compiled {ms(p['compiled_step']):.2f} ms = "
                  f"{p['compiled_over_floor_with_state']:.2f}x floor + state")
        print_table(f"decode step ({S.n_layer} layers, after a {S.prompt_len}-token prompt; "
                    f"compiled: generate(compile=True)'s step)",
                    ["batch", "step ms", "tok/s", "floor ms", "x floor", "floor+state ms",
                     "x floor+state", "compiled ms", "x floor+state", "compile s"], rows)

        # end-to-end greedy generation, ours vs transformers, same weights and prompts
        res["generate_by_batch"] = [generate_vs_transformers(B, model, b) for b in S.gen_batches]
        res["generate"] = res["generate_by_batch"][0]

        # step latency after contexts of growing length (should be flat: the state has a fixed size)
        t = B.interleave({ctx: decode_step(B, model, 1, ctx) for ctx in S.contexts}, warmup=3,
                         inner={ctx: S.step_inner for ctx in S.contexts}, cheap=True)
        res["contexts"] = [{"context": ctx, "step": t[ctx]} for ctx in S.contexts]
        print_table("decode step vs context (batch 1)", ["context", "step ms"],
                    [[c, ms(t[c])] for c in S.contexts])
        res["context_spread"] = (max(ms(t[c]) for c in S.contexts)
                                 / min(ms(t[c]) for c in S.contexts))
        first, last = S.contexts[0], S.contexts[-1]
        B.add("decode", f"step at context {last} / at {first}", f"{ratio(t[last], t[first]):.2f}")

        # the same with attention layers: their step reads every cached key and value
        hybrid = hybrid_lm(B)
        layers = [i for i, layer in enumerate(hybrid.backbone.layers)
                  if isinstance(layer.mixer, mamba2.MHA)]
        th = B.interleave({ctx: decode_step(B, hybrid, 1, ctx) for ctx in S.contexts}, warmup=3,
                          inner={ctx: S.step_inner for ctx in S.contexts}, cheap=True)
        res["hybrid"] = {"attention_layers": layers,
                         "contexts": [{"context": c, "step": th[c]} for c in S.contexts]}
        print_table(f"hybrid decode step vs context (batch 1; attention at layers {layers})",
                    ["context", "step ms", "pure Mamba-2 step ms"],
                    [[c, ms(th[c]), ms(t[c])] for c in S.contexts])
        B.add("decode", f"hybrid step at context {last} / at {first}",
              f"{ratio(th[last], th[first]):.2f} (attention: {len(layers)} of {S.n_layer} layers)")
        del hybrid
    B.results["decode"] = res
    plot_decode(B, res)


def plot_decode(B: Bench, res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [c["context"] for c in res["contexts"]]
    ax.plot(ctx, [ms(c["step"]) for c in res["contexts"]], "o-", label="mamba2.py step (batch 1)")
    if "hybrid" in res:
        n = len(res["hybrid"]["attention_layers"])
        ax.plot(ctx, [ms(c["step"]) for c in res["hybrid"]["contexts"]], "s-",
                label=f"hybrid: {n} of {B.S.n_layer} layers attention")
    one = next(p for p in res["steps"] if p["batch"] == 1)
    ax.axhline(ms(one["floor"]), color="k", ls="--", alpha=0.5,
               label="floor: matrix-vector products only")
    ax.axhline(ms(one["floor_with_state"]), color="k", ls=":", alpha=0.7,
               label="floor + one read and write of each SSM state")
    length_axis(ax, ctx, "tokens already in context")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"{B.S.n_layer}-layer LM decode step, {B.args.dtype}, {B.device.type}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(B.out / "decode_latency.png", dpi=120)
    plt.close(fig)


# ======================================================================================= 4. train

def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy through the library's own training call, model(ids, labels=ids):
    ours and transformers' both shift the labels inside."""
    out = model(ids, labels=ids)
    return out if isinstance(out, torch.Tensor) else out.loss


def logits_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The same loss taken on returned logits: what a loss written outside the model costs."""
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_step(model, ids: torch.Tensor, loss_fn=lm_loss):
    """Forward + backward of the next-token cross-entropy; returns the loss."""
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach()


def saved_for_backward_bytes(loss_fn, module) -> int:
    """Bytes of the distinct storages autograd keeps for backward while loss_fn() runs, the module's
    parameters excluded (they exist anyway). Tensors that torch.utils.checkpoint (the
    memory-efficient path) keeps to itself are not seen, which is the point: they are recomputed in
    backward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(seen.values())


def bench_train(B: Bench):
    S = B.S
    L, n = S.train_len, S.train_layers
    ids = B.ids(1, L)
    res = {"length": L, "layers": n, "runs": {}}
    models = {"ours mem-eff": B.lm(n, use_mem_eff_path=True).train(),
              "ours plain": B.lm(n, use_mem_eff_path=False).train()}
    try:
        models["transformers"] = hf_lm(models["ours mem-eff"], S, n).train()
    except Exception as e:
        res["transformers_error"] = err_text(e)
    # same weights, so the same loss (transformers normalises over the padded vocabulary)
    with torch.no_grad():
        res["loss"] = {name: lm_loss(model, ids).item() for name, model in models.items()}

    def step(model, loss_fn=lm_loss):
        def run():
            train_step(model, ids, loss_fn)
            model.zero_grad(set_to_none=True)
        return run
    fns = {name: step(model) for name, model in models.items()}
    fns["ours mem-eff, loss on logits"] = step(models["ours mem-eff"], logits_loss)
    t = B.interleave(fns)
    for name, model in models.items():
        res["runs"][name] = {
            "step": t[name], "tokens_per_s": L / t[name]["median_s"],
            "saved_mb": saved_for_backward_bytes(lambda: lm_loss(model, ids), model) / 2**20}
    res["runs"]["ours mem-eff, loss on logits"] = {
        "step": t["ours mem-eff, loss on logits"],
        "tokens_per_s": L / t["ours mem-eff, loss on logits"]["median_s"],
        "saved_mb": saved_for_backward_bytes(lambda: logits_loss(models["ours mem-eff"], ids),
                                             models["ours mem-eff"]) / 2**20}
    # the Mamba-2 layers alone: backbone forward + backward, without the embedding and the LM head
    if "transformers" in models:
        def backbone_step(backbone):
            def run():
                out = backbone(ids)
                hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
                hidden.square().mean().backward()
                backbone.zero_grad(set_to_none=True)
            return run
        tb = B.interleave({"ours": backbone_step(models["ours mem-eff"].backbone),
                           "transformers": backbone_step(models["transformers"].backbone)})
        res["backbone"] = {"ours": tb["ours"], "transformers": tb["transformers"],
                           "speedup_vs_transformers": ratio(tb["transformers"], tb["ours"])}
    # the same for one block alone: the LM head does not dilute the difference
    u = B.randn(1, L, S.d_model)
    res["block_saved_mb"] = {}
    for name, eff in (("ours mem-eff", True), ("ours plain", False)):
        block = B.block(use_mem_eff_path=eff).train()
        saved = saved_for_backward_bytes(lambda: block(u).square().mean(), block)
        res["block_saved_mb"][name] = saved / 2**20
    if "transformers" in models:
        mixer = hf_mixer(B.block(), S).train()
        saved = saved_for_backward_bytes(lambda: mixer(u).square().mean(), mixer)
        res["block_saved_mb"]["transformers"] = saved / 2**20
    # peak memory of one step, each in a fresh process
    specs = [{"what": "train", "impl": "ours", "mem_eff": True, "length": L,
              "name": "ours mem-eff"},
             {"what": "train", "impl": "ours", "mem_eff": False, "length": L,
              "name": "ours plain"}]
    # --quick: no transformers import in the subprocess
    if "transformers" in models and not B.args.quick:
        specs.append({"what": "train", "impl": "transformers", "length": L, "name": "transformers"})
    for p in run_memory_points(B, specs):
        res["runs"][p["name"]]["peak"] = p
    for name in res["runs"]:
        res["runs"][name].setdefault("peak", {"peak_mb": None, "error": "not measured"})
    models = None   # drop the dict (not `del`: the lambdas above refer to it)
    runs = res["runs"]
    eff, plain = runs["ours mem-eff"], runs["ours plain"]
    res["mem_eff_over_plain"] = {
        "time": ratio(t["ours mem-eff"], t["ours plain"]),
        "saved_bytes": eff["saved_mb"] / plain["saved_mb"],
        "block_saved_bytes": (res["block_saved_mb"]["ours mem-eff"]
                              / res["block_saved_mb"]["ours plain"]),
        "peak": (eff["peak"]["peak_mb"] / plain["peak"]["peak_mb"]
                 if eff["peak"].get("peak_mb") is not None and plain["peak"].get("peak_mb")
                 else None)}
    if "transformers" in runs:
        res["speedup_vs_transformers"] = ratio(t["transformers"], t["ours mem-eff"])
        res["speedup_plain_vs_transformers"] = ratio(t["transformers"], t["ours plain"])
    B.results["train"] = res
    rows = [[name, ms(r["step"]), r["tokens_per_s"], r["saved_mb"], mb_or_error(r["peak"])]
            for name, r in runs.items()]
    print_table(f"training step, {n} layers, {L} tokens, batch 1, model(ids, labels=ids)",
                ["", "ms", "tok/s", "saved-for-backward MB", "peak growth MB"], rows)
    print("  losses (same weights): " + ", ".join(f"{k} {v:.6f}" for k, v in res["loss"].items()))
    print("  saved for backward by one block alone, MB: " + ", ".join(
        f"{name} {mb:.1f}" for name, mb in res["block_saved_mb"].items()))
    r = res["mem_eff_over_plain"]
    print(f"  mem-eff / plain: time {r['time']:.2f}, saved tensors {r['saved_bytes']:.2f} "
          f"(one block alone {r['block_saved_bytes']:.2f}), peak RSS {fmt(r['peak'])}")
    if "speedup_vs_transformers" in res:
        print(f"  throughput vs transformers: mem-eff {res['speedup_vs_transformers']:.2f}x, "
              f"plain {res['speedup_plain_vs_transformers']:.2f}x; the {n} Mamba-2 layers alone "
              f"(backbone forward + backward) {res['backbone']['speedup_vs_transformers']:.2f}x")
    B.add("train", f"step, {n} layers x {L} tokens (mem-eff)",
          f"{ms(eff['step']):.0f} ms ({eff['tokens_per_s']:,.0f} tok/s)")
    if "speedup_vs_transformers" in res:
        B.add("train", "throughput vs transformers: LM step mem-eff, plain; the layers alone",
              f"{res['speedup_vs_transformers']:.2f}x, "
              f"{res['speedup_plain_vs_transformers']:.2f}x; "
              f"{res['backbone']['speedup_vs_transformers']:.2f}x")
    B.add("train", "mem-eff / plain: peak RSS, time; saved tensors (LM; one block)",
          f"{fmt(r['peak'], 2)}, {r['time']:.2f}; "
          f"{r['saved_bytes']:.2f}; {r['block_saved_bytes']:.2f}")


# ======================================================================================== 5. bf16

def bench_bf16(B: Bench):
    S = B.S
    L = S.ref_length
    res = {}
    with torch.no_grad():
        block32 = B.block().float()
        block16 = copy.deepcopy(block32).to(torch.bfloat16)
        u = B.randn(1, L, S.d_model, dtype=torch.float32)
        u16 = u.to(torch.bfloat16)
        t = B.interleave({"fp32": lambda: block32(u), "bf16": lambda: block16(u16)}, cheap=True)
        diff = ((block16(u16).float() - block32(u)).abs().max().item()
                / block32(u).abs().max().item())
        res["block"] = {"length": L, "fp32": t["fp32"], "bf16": t["bf16"],
                        "bf16_over_fp32": ratio(t["bf16"], t["fp32"]), "max_rel_diff": diff}
    with torch.inference_mode():
        lm32 = B.lm(S.n_layer).float()
        lm16 = copy.deepcopy(lm32).to(torch.bfloat16)
        t = B.interleave({"fp32": decode_step(B, lm32, 1, S.prompt_len),
                          "bf16": decode_step(B, lm16, 1, S.prompt_len)},
                         warmup=3, inner={"fp32": S.step_inner, "bf16": S.step_inner}, cheap=True)
        res["decode_step"] = {"fp32": t["fp32"], "bf16": t["bf16"],
                              "bf16_over_fp32": ratio(t["bf16"], t["fp32"])}
        del lm16
    model = B.lm(S.train_layers, use_mem_eff_path=True).float().train()
    ids = B.ids(1, S.train_len)

    def step(autocast: bool):
        def run():
            with torch.autocast(B.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(model, ids)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run
    t = B.interleave({"fp32": step(False), "bf16": step(True)})
    res["train_step_autocast"] = {"fp32": t["fp32"], "bf16": t["bf16"],
                                  "bf16_over_fp32": ratio(t["bf16"], t["fp32"])}
    B.results["bf16"] = res
    labels = {"block": f"block forward at {L}",
              "decode_step": f"decode step ({S.n_layer} layers, batch 1)",
              "train_step_autocast": f"training step ({S.train_layers} layers x {S.train_len}, "
                                     f"autocast)"}
    rows = [[label, ms(res[k]["fp32"]), ms(res[k]["bf16"]), res[k]["bf16_over_fp32"]]
            for k, label in labels.items()]
    print_table("bfloat16 vs float32 (same rounds)", ["", "fp32 ms", "bf16 ms", "bf16/fp32"], rows)
    print(f"  block output, bf16 vs fp32: max relative difference {diff:.1e}")
    B.add("bf16", f"bf16/fp32 time: block at {L}, decode step, training step (autocast)",
          f"{res['block']['bf16_over_fp32']:.2f}, {res['decode_step']['bf16_over_fp32']:.2f}, "
          f"{res['train_step_autocast']['bf16_over_fp32']:.2f}")


# ===================================================================================== 6. compile

def bench_compile(B: Bench):
    """torch.compile with inductor (the default backend). --quick compiles with backend "eager"
    instead (dynamo tracing only, seconds instead of the minute inductor's C++ code generation can
    take) and counts graph breaks from dynamo's counters instead of running explain a second
    time."""
    S = B.S
    L = S.ref_length
    backend = "eager" if B.args.quick else "inductor"
    block = B.block()
    u = B.randn(1, L, S.d_model)
    res = {"length": L, "backend": backend}
    with torch.no_grad():
        try:
            dynamo = importlib.import_module("torch._dynamo")
            if not B.args.quick:
                dynamo.reset()
                explanation = dynamo.explain(block)(u)
                res["graph_count"] = explanation.graph_count
                res["graph_break_count"] = explanation.graph_break_count
                res["break_reasons"] = [str(getattr(r, "reason", r))[:200]
                                        for r in explanation.break_reasons][:10]
        except Exception as e:
            res["explain_error"] = err_text(e)
        try:
            dynamo = importlib.import_module("torch._dynamo")
            dynamo.reset()
            counters = importlib.import_module("torch._dynamo.utils").counters
            counters.clear()
            compiled = torch.compile(block, backend=backend)
            start = time.perf_counter()
            y = compiled(u)
            sync(B.device)
            res["compile_s"] = time.perf_counter() - start
            res.setdefault("graph_break_count", sum(counters["graph_break"].values()))
            res["max_abs_diff"] = (y - block(u)).abs().max().item()
            t = B.interleave({"eager": lambda: block(u), "compiled": lambda: compiled(u)},
                             cheap=True)
            res["eager"], res["compiled"] = t["eager"], t["compiled"]
            res["compiled_over_eager"] = ratio(t["compiled"], t["eager"])
        except Exception as e:      # e.g. inductor without a C++ compiler
            res["compile_error"] = err_text(e, 600)
    B.results["compile"] = res
    if "compile_error" in res:
        print(f"\ntorch.compile unavailable: {res['compile_error']}")
        B.add("compile", "torch.compile", "unavailable: " + res["compile_error"][:80])
    else:
        print_table(f"torch.compile(block, backend={backend!r}) at {L}",
                    ["eager ms", "compiled ms", "compiled/eager", "max |diff|", "compile s",
                     "graph breaks"],
                    [[ms(res["eager"]), ms(res["compiled"]), res["compiled_over_eager"],
                      f"{res['max_abs_diff']:.1e}", res["compile_s"],
                      res.get("graph_break_count", res.get("explain_error"))]])
        B.add("compile", f"compiled ({backend}) / eager time at {L}; graph breaks; max abs diff",
              f"{res['compiled_over_eager']:.2f}; {res.get('graph_break_count', '?')}; "
              f"{res['max_abs_diff']:.0e}")
    for r in res.get("break_reasons", []):
        print(f"  graph break: {r}")


# ======================================================================================= 7. chunk

def bench_chunk(B: Bench):
    S = B.S
    L = S.ref_length
    kind = B.device.type
    default_q = mamba2.CHUNK_LEN_CAP.get(kind, 256)
    default_blk = mamba2.SPAN_LEN.get(kind, L)
    saved = (dict(mamba2.CHUNK_LEN_CAP), dict(mamba2.SPAN_LEN))
    block = B.block()
    u = B.randn(1, L, S.d_model)

    def setting(q, blk):
        def run():
            mamba2.CHUNK_LEN_CAP[kind] = q
            block.config.chunk_size = q
            mamba2.SPAN_LEN[kind] = blk
            block(u)
        return run
    try:
        with torch.no_grad():
            t = B.interleave({(q, blk): setting(q, blk)
                              for q in S.chunk_sizes for blk in S.seq_blocks})
    finally:   # module-level knobs: put them back whatever happened
        mamba2.CHUNK_LEN_CAP.clear(); mamba2.CHUNK_LEN_CAP.update(saved[0])
        mamba2.SPAN_LEN.clear(); mamba2.SPAN_LEN.update(saved[1])
    grid = [{"chunk": q, "seq_block": blk, "time": t[q, blk]} for q, blk in t]
    best = min(grid, key=lambda g: g["time"]["median_s"])
    B.results["chunk"] = {"length": L, "grid": grid, "default_chunk": default_q,
                          "default_seq_block": default_blk,
                          "best": {"chunk": best["chunk"], "seq_block": best["seq_block"]}}
    t = {(g["chunk"], g["seq_block"]): ms(g["time"]) for g in grid}
    mark = lambda q, blk: "*" if (q, blk) == (default_q, default_blk) else ""
    headers = ["chunk \\ seq block"] + [f"{blk}" for blk in S.seq_blocks]
    rows = [[f"{q}"] + [f"{t[q, blk]:.1f}{mark(q, blk)}" for blk in S.seq_blocks]
            for q in S.chunk_sizes]
    print_table(f"block forward at {L}, ms, by chunk length and sequence block length "
                f"(* = default)", headers, rows)
    print(f"  fastest: chunk {best['chunk']}, seq block {best['seq_block']} "
          f"({ms(best['time']):.1f} ms)")
    default = next((g for g in grid if (g["chunk"], g["seq_block"]) == (default_q, default_blk)),
                   None)
    B.add("chunk", f"default (chunk {default_q}, seq block {default_blk}) / fastest in grid",
          f"{ratio(default['time'], best['time']):.2f} "
          f"(fastest: {best['chunk']}, {best['seq_block']})"
          if default else "default not in grid")
    md = ["| chunk \\ seq block | " + " | ".join(str(b) for b in S.seq_blocks) + " |",
          "|---|" + "---|" * len(S.seq_blocks)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    B.extra_md.append(f"Block forward at {L} tokens, ms, by chunk length and sequence block length "
                      f"(* = default):\n\n" + "\n".join(md))


# ============================================================================ 8. context parallel

def bench_context(B: Bench):
    """One training step (forward + backward of the next-token loss) of a cp_layers-layer model
    of the 130m shapes on one cp_length-token sequence split over K gloo processes (K = 1 is one
    process, no group): the step's time and each rank's peak memory above what it held before
    (VmHWM, see peak_rss_kib), the loss equal for every K. The K processes share this machine's
    cores (threads per rank = --threads // K, at least 1), so time measures the cost of the
    wavefront and the communication, not a speed-up."""
    import tempfile

    import torch.multiprocessing as mp
    S = B.S
    res = {"length": S.cp_length, "layers": S.cp_layers, "vocab": S.cp_vocab, "points": []}
    rows = []
    for k in S.cp_ranks:
        out = Path(tempfile.mkdtemp())
        spec = {"k": k, "shapes": asdict(S), "reps": B.args.reps, "threads": B.args.threads}
        try:
            mp.spawn(_context_worker, args=(spec, str(out)), nprocs=k)
            ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(k)]
        except Exception as e:                                  # a rank died: say so, go on
            res["points"].append({"ranks": k, "error": err_text(e)})
            continue
        p = {"ranks": k, "step_s": ranks[0]["step_s"], "loss": ranks[0]["loss"],
             "peak_mb_per_rank": [r["peak_mb"] for r in ranks]}
        res["points"].append(p)
    base = next((p for p in res["points"] if p.get("ranks") == 1 and "error" not in p), None)
    for p in res["points"]:
        if "error" in p:
            rows.append([p["ranks"], p["error"], "", "", ""])
            continue
        if base:
            p["time_over_1"] = p["step_s"] / base["step_s"]
            p["peak_over_1"] = max(p["peak_mb_per_rank"]) / max(base["peak_mb_per_rank"])
            p["loss_diff_vs_1"] = abs(p["loss"] - base["loss"])
        rows.append([p["ranks"], f"{p['step_s']:.2f}", f"{max(p['peak_mb_per_rank']):.0f}",
                     f"{p.get('time_over_1', float('nan')):.2f}",
                     f"{p.get('peak_over_1', float('nan')):.2f}"])
        B.add("context", f"train step, {S.cp_length} tokens, {p['ranks']} rank(s)",
              f"{p['step_s']:.2f} s, peak {max(p['peak_mb_per_rank']):.0f} MB/rank")
    B.results["context"] = res
    print_table(f"context parallelism: {S.cp_layers}-layer model, one {S.cp_length}-token "
                f"sequence, gloo", ["ranks", "step s", "peak MB/rank", "time / K=1",
                                    "peak / K=1"], rows)


def _context_worker(rank: int, spec: dict, out: str):
    import torch.distributed as dist
    k, S = spec["k"], Shapes(**spec["shapes"])
    torch.set_num_threads(max(1, spec["threads"] // k))
    group = None
    if k > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                world_size=k)
        group = dist.group.WORLD
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=S.d_model, d_state=S.d_state,
                                           headdim=S.headdim, n_layer=S.cp_layers,
                                           vocab_size=S.cp_vocab))
    ids = torch.randint(0, S.cp_vocab, (1, S.cp_length),
                        generator=torch.Generator().manual_seed(1))
    start, end = rank * S.cp_length // k, (rank + 1) * S.cp_length // k
    piece = ids[:, start:end]

    def step():
        loss = model(piece, labels=piece, cp_group=group)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    before = _rss_mb()
    peak_rss_reset()
    loss = step()                                               # warm-up (and the memory peak)
    peak = peak_rss_kib()[0] / 1024 - before
    times = []
    for _ in range(spec["reps"]):
        if group is not None:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if group is not None:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"step_s": statistics.median(times), "loss": loss, "peak_mb": peak}))
    if group is not None:
        dist.destroy_process_group()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ======================================================================================== summary

def summary_markdown(B: Bench, info: dict) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores_usable']} cores, {info['isa']}, "
             f"torch {info['torch']}, {info['threads']} threads, {info['device']}, {info['dtype']}"
             + (", --quick shapes" if B.args.quick else "") + ".", "",
             "| section | measurement | result |", "|---|---|---|"]
    lines += [f"| {s} | {w} | {v} |" for s, w, v in B.summary]
    for block in B.extra_md:
        lines += ["", block]
    return "\n".join(lines) + "\n"


RUNNERS = {"block": bench_block, "memory": bench_memory, "decode": bench_decode,
           "train": bench_train, "bf16": bench_bf16, "compile": bench_compile,
           "chunk": bench_chunk, "context": bench_context}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -c 'import bench; help(bench)') for what each "
               "section measures.")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and 2 repetitions (a smoke test, < 20 s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--only", default=None, help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default 2; 1 with --quick, which is then immune "
                         "to a busy machine)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed rounds per comparison, 3x as many for quick ones "
                         "(default 5; 2 with --quick)")
    ap.add_argument("--out", default="assets", help="folder for the plots, bench.json and bench.md")
    ap.add_argument("--_memory_point", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    args.sections = (SECTIONS if not args.only
                     else [s.strip() for s in args.only.split(",") if s.strip()])
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._memory_point is not None:     # internal: memory measurements in this fresh process
        for spec in json.loads(args._memory_point):
            print(json.dumps(memory_point(spec)), flush=True)
        return
    torch.set_num_threads(args.threads)
    B = Bench(args)
    B.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args, B.device)
    print(f"machine: {info['cpu']} | {info['cores']} cores ({info['cores_usable']} usable) | "
          f"ISA {info['isa']} | torch {info['torch']} | transformers {info['transformers']} | "
          f"{info['threads']} threads | "
          f"device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''} | "
          f"{info['dtype']} | "
          f"load average {', '.join(f'{x:.2f}' for x in info['load_average'] or [])}")
    print(f"shapes: {'quick (tiny)' if args.quick else 'mamba2-130m'}: d_model {B.S.d_model}, "
          f"d_state {B.S.d_state}, headdim {B.S.headdim}, {B.S.n_layer} layers, "
          f"vocab {B.S.vocab}; {args.reps} reps (median)")
    start = time.perf_counter()
    seconds = {}
    for name in args.sections:
        t0 = time.perf_counter()
        RUNNERS[name](B)
        seconds[name] = time.perf_counter() - t0
    md = summary_markdown(B, info)
    report = {"machine": info,
              "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "shapes": asdict(B.S), "section_seconds": seconds, "results": B.results,
              "summary": B.summary}
    (B.out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (B.out / "bench.md").write_text(md)
    print("\n" + md)
    print(f"[{time.perf_counter() - start:.1f} s; "
          f"wrote {B.out}/bench.json, bench.md and the plots]")


if __name__ == "__main__":
    main()
