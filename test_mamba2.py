"""The test suite of mamba2.py. Every test compares against an oracle or checks a property that
could fail; no test touches the network, and timings are never asserted.

Oracles (sections 1-2, at the top, independent of mamba2.py's internals: they read a module's
config and parameters only):
  - `recurrence`: the SSM token by token, in float64, from the paper; differentiable, so autograd
    through it checks the scan's hand-written backward;
  - `reference_block`: the whole Mamba-2 block from its definition on top of `recurrence`, for
    every block option (differentiable in its input, for second derivatives);
  - `mha_reference`: the attention layer of hybrid models query by query, on `rotary_reference`;
  - `group_rmsnorm` and `causal_conv_reference`, the parts both of them use;
  - transformers' pure-PyTorch Mamba2Mixer / Mamba2ForCausalLM on the same weights (the mixer
    also in float64, its internal float32 casts redirected), and its logits processors;
  - the same tokens chunked vs stepped vs in pieces through the cache; packed vs separate
    sequences; float64 gradcheck; single-process vs 2-process distributed training.

Sections (top to bottom):
     1. helpers                     tensors, errors, segment layouts, modules, caches, strategies
     2. oracles                     recurrence, conv, norm, block, rotary, attention, transformers
     3. the scan                    ssd vs the recurrence, properties, chunk size, final state,
                                    gradients, linear memory, a million tokens
     4. convolution and norm
     5. the block vs oracles        transformers' mixer, the reference block, chunk size,
                                    gradcheck, the fused function
     6. the cache                   pieces, steps, reset, grad mode, truncated backpropagation
     7. packing                     seq_idx, cu_seqlens, learned initial states
     8. hostile values              non-finite inputs, fp16 overflow, extreme decay
     9. higher-order gradients      second derivatives, Hessian-vector products, explicit states
    10. memory-efficient path, long inputs, low precision
    11. config and initialisation
    12. input validation            the named-error tables; failing calls leave caches untouched
    13. checkpoints                 transformers and mamba_ssm formats, round trips, errors,
                                    atomic saves, confinement, pickle safety
    14. the language model          forward, the fused loss, cache, packing
    15. generation                  padding, sampling, eos, streaming, host syncs, static decode
    16. hybrid models               attention layers, their cache, checkpoints
    17. backbone and classifier
    18. command line
    19. shipped model, scripts, notebook, benchmark, README
    20. distributed training        DDP, FSDP2
    21. context parallelism           cp_group vs the whole sequence, bytes sent, errors
    22. train.py on torchrun          DDP, FSDP2, --context-parallel, resume
    23. checkpoints, part 2           exact dtypes, interrupted saves, data loss
    24. more promises                 segments through caches, lint, named errors
    25. mutant killers                fused loss scaling, GatedMLP, save/load of every field, ...
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import re
import shlex
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mamba2
from mamba2 import (InferenceCache, Mamba2, Mamba2Config, Mamba2ForSequenceClassification,
                    Mamba2LMHeadModel, Mamba2Model, RMSNormGated, causal_conv1d,
                    causal_conv1d_step, mamba_split_conv1d_scan_combined, rms_norm_gated, ssd,
                    ssd_step)
from mamba2 import GatedMLP, TextStreamer
import inspect
import io
import random
import shutil
import tempfile
import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # no test touches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    from transformers import Mamba2Config as HFMamba2Config
    from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2
    from transformers.utils import logging as hf_logging
except Exception:  # pragma: no cover - transformers is in requirements.txt
    hf_mamba2 = None

F64 = torch.float64
REPO = Path(__file__).resolve().parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": str(REPO)}
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# =========================================================================================
# ==== 1. helpers
# =========================================================================================

# ------------------------------------------------------------------ tensors and error measures

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64, scale=1.0) -> torch.Tensor:
    """Standard normal draws, made in float64 and then cast (the same values in every dtype)."""
    return torch.randn(*shape, generator=gen(seed), dtype=F64).mul(scale).to(dtype)


def uniform(*shape, lo, hi, seed=0, dtype=F64) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen(seed), dtype=F64) * (hi - lo) + lo).to(dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, both promoted to float64."""
    actual, expected = actual.detach().to(F64), expected.detach().to(F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)


def norm_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = actual.detach().to(F64), expected.detach().to(F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_rel(actual, expected, tol, what=""):
    """rel_err(actual, expected) <= tol."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_norm_rel(actual, expected, tol, what=""):
    """norm_rel(actual, expected) <= tol."""
    err = norm_rel(actual, expected)
    assert err <= tol, f"{what}: norm-relative error {err:.3e} > {tol:.1e}"


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    """|actual - expected| <= atol + rtol |expected| elementwise (torch.testing.assert_close),
    same shape, dtypes free."""
    expected = expected.to(actual.dtype) if isinstance(expected, torch.Tensor) else expected
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------ segment layouts

def seq_idx_from_lengths(lengths, first=0, gaps=1) -> torch.Tensor:
    """Segment lengths -> non-decreasing segment ids (1-D, int64): the first segment has id `first`
    and the id grows by `gaps` (an int, or one int >= 1 per later segment) at each new segment."""
    ids, cur = [], first
    for i, n in enumerate(lengths):
        if i:
            cur += gaps if isinstance(gaps, int) else gaps[i - 1]
        ids += [cur] * n
    return torch.tensor(ids, dtype=torch.long)


def packed_rows(*rows, **kw) -> torch.Tensor:
    """seq_idx (len(rows), l) of one list of segment lengths per row."""
    return torch.stack([seq_idx_from_lengths(lengths, **kw) for lengths in rows])


def lengths_from_cuts(l: int, cuts) -> list:
    points = [0] + sorted(cuts) + [l]
    return [b - a for a, b in zip(points[:-1], points[1:])]


def segment_bounds(row_ids):
    """[(start, end), ...] of the runs of equal ids in a 1-D sequence."""
    ids = list(row_ids)
    bounds, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            bounds.append((start, t))
            start = t
    return bounds


@contextlib.contextmanager
def span_len(n):
    """Temporarily process long inputs on the CPU in spans of n tokens (None: in one pass); the
    module setting is always restored."""
    old = dict(mamba2.SPAN_LEN)
    if n is None:
        mamba2.SPAN_LEN.clear()
    else:
        mamba2.SPAN_LEN["cpu"] = n
    try:
        yield
    finally:
        mamba2.SPAN_LEN.clear()
        mamba2.SPAN_LEN.update(old)


CPU_SPAN = mamba2.SPAN_LEN.get("cpu", 256)     # tokens per processing span of a long CPU input


# ---------------------------------------------------------------------------------- modules

def _spread_dt_bias(h: int, g: torch.Generator) -> torch.Tensor:
    """dt_bias (h,) = softplus⁻¹(dt) with log dt spread over [log 1e-3, 0]: one draw from the middle
    half of each of h equal strata, in random order (float64)."""
    lo, hi = math.log(1e-3), 0.0
    strata = (torch.arange(h, dtype=F64) + 0.25 + 0.5 * torch.rand(h, generator=g, dtype=F64)) / h
    dt = torch.exp(lo + (hi - lo) * strata[torch.randperm(h, generator=g)])
    return dt + torch.log(-torch.expm1(-dt))


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, emb_std: float = 0.3) -> torch.nn.Module:
    """Move every parameter of a block, an attention layer or a language model (ours or
    transformers') away from its special initial value, so that a wrong use of any of them shows
    in the output: D and the norm weights near 1 but not 1, dt_bias spread (step sizes from 1e-3
    to 1 whatever the initial draws), A_log shifted, conv taps and biases and linear biases
    random, init_states random, embeddings and lm_head N(0, emb_std) (logits of order 1)."""
    g = gen(seed)
    for name, prm in module.named_parameters():          # a tied lm_head comes once, as embedding
        def rnd(scale):
            return (torch.randn(prm.shape, generator=g, dtype=F64) * scale).to(prm.dtype)
        parts = name.split(".")
        last, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
        if last == "D" or (last == "weight" and owner.startswith("norm")):
            prm.copy_(1 + rnd(0.4))
        elif last == "dt_bias":
            prm.copy_(_spread_dt_bias(prm.numel(), g).to(prm.dtype))
        elif last == "A_log":
            prm.add_(rnd(0.3))
        elif last == "init_states":
            prm.copy_(rnd(0.5))
        elif owner == "conv1d":
            prm.copy_(rnd(0.4))
        elif last == "bias":
            prm.copy_(rnd(0.3))
        elif owner in ("embedding", "embeddings", "lm_head"):
            prm.copy_(rnd(emb_std))
    return module


BLOCK_DEFAULTS = dict(d_model=8, d_state=3, headdim=4, chunk_size=4)   # 4 heads, chunks of 4


def make_block(seed=0, dtype=F64, **cfg) -> Mamba2:
    """A randomized block; by default tiny (BLOCK_DEFAULTS), so that short inputs cross chunks."""
    torch.manual_seed(seed)
    return randomize(Mamba2(Mamba2Config(**{**BLOCK_DEFAULTS, **cfg}), dtype=dtype), seed)


LM_VOCAB = 100
LM_DEFAULTS = dict(d_model=32, n_layer=2, d_state=8, headdim=8, expand=2, d_conv=4, chunk_size=16,
                   vocab_size=LM_VOCAB, pad_vocab_size_multiple=16)   # 8 heads, vocab 100 -> 112
SMALL_LM = dict(d_model=16, d_state=4, headdim=8, chunk_size=4, vocab_size=37,
                pad_vocab_size_multiple=8)                            # 4 heads, vocab 37 -> 40


def lm_config(**kw) -> Mamba2Config:
    return Mamba2Config(**{**LM_DEFAULTS, **kw})


def lm_model(seed=0, dtype=F64, emb_std=0.3, cls=Mamba2LMHeadModel, **kw):
    """A randomized language model (or `cls` of the same config) of lm_config(**kw), in eval
    mode."""
    torch.manual_seed(seed)
    return randomize(cls(lm_config(**kw), dtype=dtype), seed, emb_std=emb_std).eval()


def lm_ids(b, l, seed=0, high=LM_VOCAB):
    return torch.randint(0, high, (b, l), generator=gen(seed))


ATTN_CFG = dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True, d_conv=3, mlp_dim=16)
HYBRID = dict(d_model=32, n_layer=3, d_state=4, headdim=8, chunk_size=4, vocab_size=50,
              pad_vocab_size_multiple=8, attn_layer_idx=[1])           # attention at layer 1


def hybrid_model(seed=0, dtype=F64, attn=None, **kw) -> Mamba2LMHeadModel:
    """A randomized hybrid model: Mamba-2 layers 0 and 2, an attention layer (ATTN_CFG) at 1."""
    return lm_model(seed, dtype, **{**HYBRID, "attn_cfg": {**ATTN_CFG, **(attn or {})}, **kw})


def xbc_tail(block: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """What the conv cache must hold after u: the last d_conv *pre-convolution* xBC inputs,
    (b, conv_dim, w)."""
    cfg = block.config
    start = 2 * (cfg.d_inner - cfg.d_ssm) + cfg.d_ssm
    xbc = block.in_proj(u)[..., start:start + cfg.conv_dim]
    return xbc[:, -cfg.d_conv:].transpose(1, 2)


def run_in_pieces(block, u, sizes, cache):
    outs, start = [], 0
    for size in sizes:
        outs.append(block(u[:, start:start + size], cache=cache))
        start += size
    assert start == u.shape[1]
    return torch.cat(outs, dim=1)


def packed_vs_alone(block, u, seq_idx=None, cu_seqlens=None, initial_states=None, tol=1e-12):
    """Check a packed call against each segment run on its own (initial_states belong to the
    first segment of a row; the final state is the last segment's); returns nothing, asserts."""
    with torch.no_grad():
        got, state = block(u, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                           initial_states=initial_states, return_final_states=True)
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist()
            rows = [[(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]]
        else:
            rows = [segment_bounds(seq_idx[r].tolist()) for r in range(u.shape[0])]
        for r, bounds in enumerate(rows):
            for i, (s, e) in enumerate(bounds):
                init = None if (initial_states is None or i > 0) else initial_states[r:r + 1]
                alone, alone_state = block(u[r:r + 1, s:e], initial_states=init,
                                           return_final_states=True)
                assert_rel(got[r:r + 1, s:e], alone, tol, f"row {r} segment {s}:{e}")
            assert_rel(state[r:r + 1], alone_state, tol,
                       f"row {r} final state vs last segment alone")


def used_cache(module, b, seed):
    """A cache of a block or a model in a non-trivial state (after 5 tokens)."""
    cache = module.allocate_inference_cache(b)
    with torch.no_grad():
        if isinstance(module, Mamba2):
            dtype = module.in_proj.weight.dtype
            module(randn(b, 5, module.config.d_model, seed=seed, dtype=dtype), cache=cache)
        else:
            module(torch.randint(0, 30, (b, 5), generator=gen(seed)), cache=cache)
    return cache


def cache_snapshot(cache):
    caches = cache if isinstance(cache, (list, tuple)) else [cache]
    return [(c.conv_state.clone(), c.ssm_state.clone()) for c in caches]


def assert_cache_unchanged(cache, snapshot):
    caches = cache if isinstance(cache, (list, tuple)) else [cache]
    assert len(caches) == len(snapshot)
    for i, (c, (conv, ssm)) in enumerate(zip(caches, snapshot)):
        assert torch.equal(c.conv_state, conv), f"layer {i}: conv_state changed by a failing call"
        assert torch.equal(c.ssm_state, ssm), f"layer {i}: ssm_state changed by a failing call"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for gloo process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plant(u, row, t, channel, value):
    """A copy of u with u[row, t, channel] = value."""
    v = u.clone()
    v[row, t, channel] = value
    return v


def scan_inputs(b=2, l=22, h=4, p=3, g=2, n=5, seed=0, requires_grad=False):
    """(x, dt, A, B, C, D, h0) for ssd, float64."""
    g_ = gen(seed)

    def r(*s):
        return torch.randn(*s, generator=g_, dtype=F64)

    x = r(b, l, h, p)
    dt = F.softplus(r(b, l, h) - 1)
    A = -torch.exp(r(h) * 0.5)
    B, C = r(b, l, g, n), r(b, l, g, n)
    D = r(h)
    h0 = r(b, h, p, n)
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, B, C, D, h0)]


SCAN_SEQ_IDX = packed_rows([5, 1, 16], [12, 10])     # segments of the two rows of scan_inputs()


class TensorSizes(TorchDispatchMode):
    """Records the largest and the total number of elements of the tensors every aten op
    returns."""

    def __init__(self):
        super().__init__()
        self.largest = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.total += t.numel()
        return out


def saved_bytes(block, u):
    """Bytes of the distinct storages autograd saves for backward during one training forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(u)
    return sum(storages.values())


# ------------------------------------------------------------------------ language-model files

def official_keys(n_layer: int, d_intermediate: int) -> set:
    """The state-dict names of mamba_ssm's MambaLMHeadModel with Mamba2 mixers (written out by
    hand)."""
    keys = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(n_layer):
        pre = f"backbone.layers.{i}."
        keys |= {pre + k for k in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                   "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log",
                                   "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight")}
        if d_intermediate > 0:
            keys |= {pre + "norm2.weight", pre + "mlp.fc1.weight", pre + "mlp.fc2.weight"}
    return keys


def write_official(directory: Path, model: Mamba2LMHeadModel) -> dict:
    """Write config.json + pytorch_model.bin as mamba_ssm does (lm_head stored even when tied);
    returns the state dict written."""
    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "d_model": cfg.d_model, "d_intermediate": cfg.d_intermediate, "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv,
                    "expand": cfg.expand, "headdim": cfg.headdim, "ngroups": cfg.ngroups,
                    "chunk_size": cfg.chunk_size},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "tie_embeddings": cfg.tie_embeddings,
    }
    (directory / "config.json").write_text(json.dumps(config))
    ours = model.state_dict()
    state = {k: ours[k].detach().clone()
             for k in sorted(official_keys(cfg.n_layer, cfg.d_intermediate))}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    return state


def safetensors_to_bin(directory: Path, **save_kwargs) -> dict:
    """Replace a checkpoint's model.safetensors by a pytorch_model.bin of the same tensors."""
    from safetensors.torch import load_file
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin", **save_kwargs)
    return state


def save_and_logits(model, directory, **kw):
    """save_pretrained(directory, **kw); returns (ids, the model's logits on them)."""
    model.save_pretrained(directory, **kw)
    ids = torch.randint(0, 30, (2, 7), generator=gen(9))
    with torch.no_grad():
        return ids, model(ids)


def left_pad(prompts, pad_value):
    """Prompts (1, l_i) -> left-padded ids (n, l) and attention mask."""
    l = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), l), pad_value, dtype=torch.long)
    mask = torch.zeros(len(prompts), l, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, l - p.shape[1]:] = p[0]
        mask[i, l - p.shape[1]:] = 1
    return ids, mask


def first_eos_rule(tokens, eos, pad):
    """Reference: keep tokens up to and including the first eos, pad afterwards; returns (tokens,
    whether an eos came)."""
    out, done = [], False
    for t in tokens:
        out.append(pad if done else t)
        done = done or t in eos
    return out, done


# ------------------------------------------------------------------------ hypothesis strategies

@st.composite
def block_configs(draw, learnable=True):
    d_model = draw(st.sampled_from([4, 6, 8]))
    expand = draw(st.sampled_from([1, 2]))
    d_inner = expand * d_model
    headdim = draw(st.sampled_from([hd for hd in (1, 2, 3, 4, 6, 8) if d_inner % hd == 0]))
    most = d_inner // headdim
    nheads = draw(st.integers(1, most - 1)) if most > 1 and draw(st.integers(0, 3)) == 0 else most
    ngroups = draw(st.sampled_from([k for k in range(1, min(nheads, 4) + 1) if nheads % k == 0]))
    return dict(d_model=d_model, expand=expand, headdim=headdim, d_ssm=nheads * headdim,
                ngroups=ngroups, d_state=draw(st.integers(1, 4)), d_conv=draw(st.integers(2, 4)),
                chunk_size=draw(st.integers(1, 16)), D_has_hdim=draw(st.booleans()),
                norm_before_gate=draw(st.booleans()),
                rmsnorm=draw(st.sampled_from([True, True, False])), bias=draw(st.booleans()),
                conv_bias=draw(st.booleans()),
                learnable_init_states=learnable and draw(st.booleans()))


def draw_cuts(data, l: int, most: int, label: str):
    """Up to `most` distinct cut points in (0, l), sorted."""
    if l < 2:
        return []
    return sorted(data.draw(st.sets(st.integers(1, l - 1), max_size=min(l - 1, most)),
                            label=label))


SPAN_LENS = st.sampled_from([1, 3, 7, 256])     # 256 > every drawn length: one span


def draw_scan_case(data):
    """Random scan inputs for the property tests: sizes, chunk length, segment layout, D (none,
    per head, per channel) and initial state. Returns (chunk, x, dt, A, B, C, D, h0, seq_idx)."""
    b = data.draw(st.integers(1, 2), label="b")
    l = data.draw(st.integers(1, 40), label="l")
    g = data.draw(st.integers(1, 2), label="g")
    h = g * data.draw(st.integers(1, 3), label="r")
    p, n = data.draw(st.integers(1, 4), label="p"), data.draw(st.integers(1, 5), label="n")
    chunk = data.draw(st.integers(1, 16), label="chunk")
    d_kind = data.draw(st.sampled_from([None, "h", "hp"]), label="D")
    with_h0 = data.draw(st.booleans(), label="h0")
    with_seq = data.draw(st.booleans(), label="seq_idx")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    x = randn(b, l, h, p, seed=seed)
    dt = uniform(b, l, h, lo=0.01, hi=1.5, seed=seed + 1)          # > 0, mild to strong decay
    A = -uniform(h, lo=0.1, hi=3.0, seed=seed + 2)                  # < 0
    B, C = randn(b, l, g, n, seed=seed + 3), randn(b, l, g, n, seed=seed + 4)
    D = {None: None, "h": randn(h, seed=seed + 5), "hp": randn(h, p, seed=seed + 5)}[d_kind]
    h0 = randn(b, h, p, n, seed=seed + 6) if with_h0 else None
    seq_idx = None
    if with_seq:
        rows = []
        for _ in range(b):
            lengths = lengths_from_cuts(l, draw_cuts(data, l, 6, "cuts"))
            gaps = data.draw(st.lists(st.integers(1, 3), min_size=len(lengths),
                                      max_size=len(lengths)), label="gaps")
            first = data.draw(st.integers(0, 2), label="first")
            rows.append(seq_idx_from_lengths(lengths, first=first, gaps=gaps))
        dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="idx dtype")
        seq_idx = torch.stack(rows).to(dtype)
    return chunk, x, dt, A, B, C, D, h0, seq_idx


# =========================================================================================
# ==== 2. oracles
# =========================================================================================

def recurrence(x, dt, A, B, C, D=None, initial_states=None, seq_idx=None, segment_start=None):
    """The SSM token by token, in float64, straight from the paper (eq. 1-2), per head:

        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_tᵀ
        y_t = S_t C_t + D x_t

    x (b, l, h, p); dt (b, l, h) > 0; A (h,) < 0; B, C (b, l, g, n), head k reading group
    k // (h / g); D None, (h,) or (h, p); initial_states (b, h, p, n), the state before token 0
    (it belongs to the first segment); seq_idx (b, l): where it changes, S restarts from
    segment_start (h, p, n) (default zeros) -- selected, so nothing of an earlier segment (not even
    a NaN) survives. Differentiable: autograd through it is the oracle of the scan's hand-written
    backward. Returns y (b, l, h, p) and the final state."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    x, dt, A, B, C = (t.to(F64) for t in (x, dt, A, B, C))
    B, C = (t.repeat_interleave(h // g, dim=2) for t in (B, C))                 # (b, l, h, n)
    if D is not None:
        D = D.to(F64) if D.dim() == 2 else D.to(F64)[:, None]                      # (h, p)
    fresh = x.new_zeros(h, p, n) if segment_start is None else segment_start.to(F64)
    state = fresh.expand(b, h, p, n) if initial_states is None else initial_states.to(F64)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
            state = torch.where(same, state, fresh)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                          # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = (state * C[:, t, :, None, :]).sum(-1)                                  # (b, h, p)
        ys.append(y if D is None else y + D * x[:, t])
    return torch.stack(ys, dim=1), state


def causal_conv_reference(x, weight, bias=None, seq_idx=None):
    """The causal depthwise convolution from its definition: x (b, l, c), weight (c, w),
    out_t = bias + sum_k weight[:, k] x_{t-(w-1-k)}, leaving out (selecting away, not multiplying
    by 0) the taps before the sequence start and those on another segment."""
    b, l, c = x.shape
    w = weight.shape[-1]
    padded = F.pad(x, (0, 0, w - 1, 0))
    seg = None if seq_idx is None else F.pad(seq_idx.to(torch.long), (w - 1, 0), value=-1)
    out = torch.zeros_like(x)
    for k in range(w):                       # the input at lag w-1-k
        term = padded[:, k:k + l] * weight[:, k]
        if seg is not None:
            term = torch.where((seg[:, k:k + l] == seq_idx).unsqueeze(-1), term, 0)
        out = out + term
    return out if bias is None else out + bias


def group_rmsnorm(x, z, weight, ngroups, norm_before_gate, eps=1e-5):
    """The gated RMSNorm from its definition, one group of channels at a time: the gate silu(z)
    before (norm_before_gate=False, official default) or after the normalisation."""
    gs = x.shape[-1] // ngroups
    out = []
    for k in range(ngroups):
        xk = x[..., k * gs:(k + 1) * gs]
        zk = None if z is None else z[..., k * gs:(k + 1) * gs]
        if zk is not None and not norm_before_gate:
            xk = xk * F.silu(zk)
        rms = torch.sqrt(torch.mean(xk * xk, dim=-1, keepdim=True) + eps)
        xk = xk / rms * weight[k * gs:(k + 1) * gs]
        if zk is not None and norm_before_gate:
            xk = xk * F.silu(zk)
        out.append(xk)
    return torch.cat(out, dim=-1)


def reference_block(block: Mamba2, u: torch.Tensor, initial_states=None, seq_idx=None,
                    clamp_dt=True):
    """The Mamba-2 block from its definition, in float64, on top of `recurrence` (no chunks, no
    fused ops; the block's weights are read, never differentiated; u may require grad):

        [z0, x0, z, xBC, dt_raw] = in_proj(u)
        xBC_t = silu(conv(xBC)_t)                     causal depthwise conv: zero history,
                                                      no input from another segment
        dt_t  = clamp(softplus(dt_raw_t + dt_bias), dt_limit),  A = -exp(A_log)
        y     = recurrence(x, dt, A, B, C, D, initial_states, seq_idx); every segment (the first
                too unless initial_states) starts from the learned init_states, or zeros
        out   = out_proj([silu(z0) x0, grouped gated RMSNorm of y by z (or y silu(z))])

    Returns (out (b, l, d_model), final state (b, h, p, n))."""
    cfg = block.config

    def W(t):
        return None if t is None else t.detach().to(F64)

    u = u.to(F64)
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    d_mlp = cfg.d_inner - cfg.d_ssm
    zxbcdt = F.linear(u, W(block.in_proj.weight), W(block.in_proj.bias))
    z0, x0, z, xbc, dt_raw = zxbcdt.split([d_mlp, d_mlp, cfg.d_ssm, cfg.conv_dim, h], dim=-1)
    xbc = F.silu(causal_conv_reference(xbc, W(block.conv1d.weight)[:, 0], W(block.conv1d.bias),
                                       seq_idx))
    x, B, C = xbc.split([cfg.d_ssm, g * n, g * n], dim=-1)
    dt = F.softplus(dt_raw + W(block.dt_bias))
    if clamp_dt:
        dt = dt.clamp(min=cfg.dt_limit[0], max=cfg.dt_limit[1])
    A = -torch.exp(W(block.A_log))
    D = W(block.D).view(h, p) if cfg.D_has_hdim else W(block.D)
    start = W(block.init_states) if cfg.learnable_init_states else None
    y, state = recurrence(x.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (g, n)),
                          C.unflatten(-1, (g, n)), D, W(initial_states), seq_idx, start)
    y = y.flatten(-2)
    if cfg.rmsnorm:
        y = group_rmsnorm(y, z, W(block.norm.weight), g, cfg.norm_before_gate, block.norm.eps)
    else:
        y = y * F.silu(z)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, W(block.out_proj.weight), W(block.out_proj.bias)), state


def rotary_reference(x, positions, dim, base, interleaved):
    """Rotary embedding from its definition, one position and one channel pair at a time: pair i
    (channels 2i, 2i+1 interleaved, else i, i + dim/2) turns by positions * base^(-2i/dim)."""
    out = x.clone()
    b, l, heads, d = x.shape
    for i in range(dim // 2):
        a, c = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
        for t in range(l):
            for r in range(b):
                angle = positions[r, t].item() * base ** (-2 * i / dim)
                x0, x1 = x[r, t, :, a], x[r, t, :, c]
                out[r, t, :, a] = x0 * math.cos(angle) - x1 * math.sin(angle)
                out[r, t, :, c] = x0 * math.sin(angle) + x1 * math.cos(angle)
    return out


def mha_reference(mha, x, seq_idx=None):
    """The attention layer from its definition: in_proj, causal depthwise conv within segments,
    rotary at each token's position in its segment, softmax(q kᵀ scale) v query by query over
    the keys of its segment up to itself (heads of a kv group sharing k and v), out_proj."""
    b, l, _ = x.shape
    h, g, dh = mha.num_heads, mha.num_heads_kv, mha.head_dim
    seq_idx = torch.zeros(b, l, dtype=torch.long) if seq_idx is None else seq_idx
    proj = F.linear(x, mha.in_proj.weight, mha.in_proj.bias)
    qkv, mlp = proj[..., :mha.qkv_dim], proj[..., mha.qkv_dim:]
    if mha.d_conv:
        qkv = causal_conv_reference(qkv, mha.conv1d.weight[:, 0], mha.conv1d.bias, seq_idx)
    q, k, v = qkv.split([h * dh, g * dh, g * dh], -1)
    q, k, v = q.unflatten(-1, (h, dh)), k.unflatten(-1, (g, dh)), v.unflatten(-1, (g, dh))
    pos = torch.zeros(b, l, dtype=torch.long)
    for t in range(1, l):
        pos[:, t] = torch.where(seq_idx[:, t] == seq_idx[:, t - 1], pos[:, t - 1] + 1, 0)
    args = (mha.rotary_emb_dim, mha.rotary_emb_base, mha.rotary_emb_interleaved)
    q, k = rotary_reference(q, pos, *args), rotary_reference(k, pos, *args)
    out = torch.zeros(b, l, h, dh, dtype=x.dtype)
    for r in range(b):
        for t in range(l):
            keys = [j for j in range(l) if seq_idx[r, j] == seq_idx[r, t] and
                    (j <= t or not mha.causal)]
            for head in range(h):
                kv_head = head // (h // g)
                scores = torch.stack([q[r, t, head] @ k[r, j, kv_head] for j in keys])
                p = torch.softmax(scores * mha.softmax_scale, 0)
                out[r, t, head] = sum(p[i] * v[r, j, kv_head] for i, j in enumerate(keys))
    y = out.flatten(-2)
    if mha.mlp_dim:
        up, gate = mlp.chunk(2, -1)
        y = torch.cat([y, up * F.silu(gate)], -1)
    return F.linear(y, mha.out_proj.weight, mha.out_proj.bias)


# ----------------------------------------------------------------------- transformers as oracle

class _TorchFloat32IsFloat64(types.ModuleType):
    """Stand-in for `torch` inside transformers' modeling_mamba2 whose `float32` is float64."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def hf_oracle_in_float64(monkeypatch):
    """transformers' pure-PyTorch path casts to float32 internally (`.float()` in the scan,
    `.to(torch.float32)` in its gated norm) whatever the input dtype, which caps a float64
    comparison at ~1e-7. Redirect those casts to float64 so the reference runs entirely in double
    precision."""
    with monkeypatch.context() as mp:
        to_float = torch.Tensor.float
        mp.setattr(hf_mamba2, "torch", _TorchFloat32IsFloat64("torch"))
        mp.setattr(torch.Tensor, "float",
                   lambda self, *a, **k: self.to(F64) if self.is_floating_point()
                   else to_float(self, *a, **k))
        yield


@pytest.fixture
def quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # its "falling back to the reference PyTorch ..." notices
    yield
    hf_logging.set_verbosity(verbosity)


def hf_lm_model(g=1, tie=False, seed=0, vocab=LM_VOCAB, hidden=64, heads=8, head_dim=16,
                state=16, chunk=16, layers=2):
    import transformers
    cfg = transformers.Mamba2Config(hidden_size=hidden, num_hidden_layers=layers,
                                    state_size=state, head_dim=head_dim, num_heads=heads,
                                    n_groups=g, expand=2, conv_kernel=4, chunk_size=chunk,
                                    vocab_size=vocab, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.Mamba2ForCausalLM(cfg).eval()


# =========================================================================================
# ==== 3. the scan
# =========================================================================================

def test_ssd_matches_recurrence_with_segments():
    x, dt, A, B, C, D, h0 = scan_inputs()
    for kwargs in (dict(), dict(D=D, initial_states=h0),
                   dict(D=D, initial_states=h0, seq_idx=SCAN_SEQ_IDX), dict(D=randn(4, 3, seed=1))):
        y, s = ssd(x, dt, A, B, C, 4, return_final_states=True, **kwargs)
        y_ref, s_ref = recurrence(x, dt, A, B, C, **kwargs)
        assert_rel(y, y_ref, 2e-15, f"ssd output {sorted(kwargs)}")        # measured 2.0e-16
        assert_rel(s, s_ref, 2e-15, f"ssd final state {sorted(kwargs)}")   # measured 1.3e-16


@PROPERTY
@given(data=st.data())
def test_ssd_equals_token_recurrence(data):
    """Chunked ssd == the recurrence, for random sizes, chunk lengths, segment layouts, D and
    h0."""
    chunk, x, dt, A, B, C, D, h0, seq_idx = draw_scan_case(data)
    b, h, p, n = x.shape[0], x.shape[2], x.shape[3], B.shape[-1]
    y, final = ssd(x, dt, A, B, C, chunk, D=D, initial_states=h0, seq_idx=seq_idx,
                   return_final_states=True)
    y_ref, final_ref = recurrence(x, dt, A, B, C, D, h0, seq_idx)
    assert y.dtype == F64 and final.shape == (b, h, p, n)
    # measured, the largest over 300 examples: 8.5e-16 and 1.7e-15
    assert_rel(y, y_ref, 9e-15, "output")
    assert_rel(final, final_ref, 2e-14, "final state")


def test_ssd_chunk_size_independence_with_segments():
    x, dt, A, B, C, D, h0 = scan_inputs(l=29)
    seq_idx = packed_rows([1, 7, 2, 19], [16, 13])
    ref = ssd(x, dt, A, B, C, 64, D=D, initial_states=h0, seq_idx=seq_idx,
              return_final_states=True)
    for chunk in (1, 3, 8, 16):
        got = ssd(x, dt, A, B, C, chunk, D=D, initial_states=h0, seq_idx=seq_idx,
                  return_final_states=True)
        assert_rel(got[0], ref[0], 2e-14, f"output, chunk {chunk}")          # measured 1.2e-15
        assert_rel(got[1], ref[1], 1e-14, f"final state, chunk {chunk}")     # measured 8.1e-16


@pytest.mark.parametrize("split", [1, 4, 9, 21])
def test_ssd_final_state_continues_as_initial_state(split):
    x, dt, A, B, C, D, h0 = scan_inputs()
    whole, whole_state = ssd(x, dt, A, B, C, 4, D=D, initial_states=h0, return_final_states=True)
    first, mid = ssd(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 4, D=D,
                     initial_states=h0, return_final_states=True)
    second, end = ssd(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], 4, D=D,
                      initial_states=mid, return_final_states=True)
    assert_rel(torch.cat([first, second], dim=1), whole, 2e-15, "output of two halves")  # 1.5e-16
    assert_rel(end, whole_state, 2e-15, "final state of two halves")    # measured 1.3e-16


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
@pytest.mark.parametrize("case", ["plain", "D_h0", "segments", "D_hdim_segments"])
def test_ssd_adjoint_equals_autograd_through_recurrence(case, chunk):
    """The scan's hand-written backward against autograd through the token-by-token recurrence:
    gradients of every input, for the output and the final state together, float64."""
    x, dt, A, B, C, D, h0 = scan_inputs(requires_grad=True)
    kwargs = {"plain": dict(), "D_h0": dict(D=D, initial_states=h0),
              "segments": dict(D=D, initial_states=h0, seq_idx=SCAN_SEQ_IDX),
              "D_hdim_segments": dict(D=randn(4, 3, seed=1).requires_grad_(),
                                      seq_idx=SCAN_SEQ_IDX)}[case]
    leaves = [x, dt, A, B, C] + [v for k, v in kwargs.items() if k != "seq_idx"]
    gy, gs = randn(2, 22, 4, 3, seed=2), randn(2, 4, 3, 5, seed=3)
    grads = []
    for scan in (lambda: ssd(x, dt, A, B, C, chunk, return_final_states=True, **kwargs),
                 lambda: recurrence(x, dt, A, B, C, **kwargs)):
        y, s = scan()
        grads.append(torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves))
    names = ["x", "dt", "A", "B", "C"] + [k for k in kwargs if k != "seq_idx"]
    for name, got, want in zip(names, *grads):
        assert_rel(got, want, 5e-14, f"d/d{name}")                  # measured 4.5e-15


@PROPERTY
@given(data=st.data())
def test_ssd_gradients_equal_token_recurrence_gradients(data):
    """The scan's hand-written backward == autograd through the recurrence, for random cases."""
    chunk, *inputs, seq_idx = draw_scan_case(data)
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    x, dt, A, B, C, D, h0 = inputs
    weights = [randn(*shape, seed=7)
               for shape in (x.shape, (x.shape[0], x.shape[2], x.shape[3], B.shape[-1]))]
    grads = []
    for scan in (lambda: ssd(x, dt, A, B, C, chunk, D=D, initial_states=h0, seq_idx=seq_idx,
                             return_final_states=True),
                 lambda: recurrence(x, dt, A, B, C, D=D, initial_states=h0, seq_idx=seq_idx)):
        y, final = scan()
        grads.append(torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(),
                                         leaves))
    for i, (got, want) in enumerate(zip(*grads)):
        assert_rel(got, want, 1e-12, f"gradient of input {i}")   # 9.1e-14 (over 300 examples)


def test_ssd_backward_without_final_state_or_output_gradient():
    """Only y, or only the final state, reaches the loss: the missing gradient is taken as zero."""
    x, dt, A, B, C, D, h0 = scan_inputs(requires_grad=True)
    for use in ("y", "state"):
        grads = []
        for scan in (lambda: ssd(x, dt, A, B, C, 4, D=D, initial_states=h0,
                                 return_final_states=True),
                     lambda: recurrence(x, dt, A, B, C, D=D, initial_states=h0)):
            y, s = scan()
            grads.append(torch.autograd.grad((y if use == "y" else s).square().sum(),
                                             [x, dt, A, B, C, D, h0], allow_unused=True))
        for got, want in zip(*grads):
            if want is None:
                assert got is None or not got.any()
            else:
                assert_rel(got, want, 6e-15, f"gradient through {use} only")   # 5.2e-16


def test_ssd_gradcheck_with_seq_idx_and_initial_states():
    x, dt, A, B, C, D, h0 = scan_inputs(b=2, l=10, h=2, p=2, g=2, n=3, seed=18,
                                        requires_grad=True)
    seq_idx = packed_rows([3, 5, 2], [1, 9])

    def f(x, dt, A, B, C, D, h0):
        return ssd(x, dt, A, B, C, 4, D=D, initial_states=h0, seq_idx=seq_idx,
                   return_final_states=True)

    assert torch.autograd.gradcheck(f, (x, dt, A, B, C, D, h0), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ssd_memory_grows_linearly():
    # With chunk 4, a (chunks x chunks) decay matrix over the whole sequence would hold (l/4)^2
    # entries per head: 65536 at l=1024 and 1048576 at l=4096, a 16x jump that dominates every
    # linear intermediate (~8 l). Linear cost means both the largest tensor and the total created
    # grow by ~4x.
    sizes = {}
    for l in (1024, 4096):
        x, dt, A, B, C, D, h0 = scan_inputs(b=1, l=l, h=2, p=2, g=1, n=2, seed=28)
        seq_idx = packed_rows([l // 3, l - l // 3])
        with torch.no_grad(), TensorSizes() as sizes[l]:
            ssd(x, dt, A, B, C, 4, D=D, initial_states=h0, seq_idx=seq_idx,
                return_final_states=True)
    assert sizes[4096].largest <= 4.5 * sizes[1024].largest, (sizes[1024].largest,
                                                               sizes[4096].largest)
    assert sizes[4096].total <= 4.5 * sizes[1024].total, (sizes[1024].total, sizes[4096].total)


def test_ssd_state_bounded_over_a_million_tokens():
    """The state carried through 1,000,000 tokens (ssd in pieces of 2^16, each continuing from the
    previous final state) obeys the analytic bound |h| <= max|dt x B^T| / (1 - max_t exp(dt_t A))
    per head, agrees with the float64 run, and a recurrent ssd_step continuation from it equals
    the chunked continuation."""
    h, p, n, piece, total = 2, 2, 2, 2 ** 16, 1_000_000
    A32 = torch.tensor([-0.5, -0.05])
    bounds = torch.zeros(h, dtype=F64)
    s32, s64 = torch.zeros(1, h, p, n), torch.zeros(1, h, p, n, dtype=F64)
    for k, start in enumerate(range(0, total, piece)):
        m = min(piece, total - start)
        # biased inputs: the state grows
        x = 0.5 + uniform(1, m, h, p, lo=-1, hi=1, seed=100 + k, dtype=torch.float32)
        B = 0.5 + uniform(1, m, 1, n, lo=-1, hi=1, seed=200 + k, dtype=torch.float32)
        C = uniform(1, m, 1, n, lo=-1, hi=1, seed=300 + k, dtype=torch.float32)
        dt = uniform(1, m, h, lo=1e-3, hi=1e-2, seed=400 + k, dtype=torch.float32)
        _, s32 = ssd(x, dt, A32, B, C, 16, initial_states=s32, return_final_states=True)
        _, s64 = ssd(x.double(), dt.double(), A32.double(), B.double(), C.double(), 16,
                     initial_states=s64, return_final_states=True)
        drive = (dt.double()[..., None, None] * x.double()[..., None]
                 * B.double()[:, :, :, None, :]).abs()
        max_decay = torch.exp(dt.double().min() * A32.double())                     # (h,)
        bounds = torch.maximum(bounds, drive.amax(dim=(0, 1, 3, 4)) / (1 - max_decay))
        assert torch.isfinite(s32).all()
        assert (s32.double().abs().amax(dim=(0, 2, 3)) <= bounds * (1 + 1e-4)).all(), \
            (k, s32, bounds)
    assert s64.abs().max() > 1.0                                 # the state is far from trivial
    assert_rel(s32, s64, 6e-6, "fp32 vs fp64 state after 1e6 tokens")   # no drift: 5.1e-7
    # recurrent continuation: 200 ssd_step calls == chunked ssd from the same state
    x = randn(1, 200, h, p, seed=7)
    dt = uniform(1, 200, h, lo=1e-3, hi=1e-2, seed=8)
    B, C = randn(1, 200, 1, n, seed=9), randn(1, 200, 1, n, seed=10)
    y_chunk, s_chunk = ssd(x, dt, A32.double(), B, C, 64, initial_states=s64,
                           return_final_states=True)
    state = s64.clone()
    y_step = torch.stack([ssd_step(x[:, t], dt[:, t], A32.double(), B[:, t], C[:, t], state)[0]
                          for t in range(200)], 1)
    assert_rel(y_step, y_chunk, 2e-14, "ssd_step outputs vs chunked")   # measured 1.4e-15
    assert_rel(state, s_chunk, 2e-14, "ssd_step state vs chunked")      # measured 1.4e-15


# =========================================================================================
# ==== 4. convolution and norm
# =========================================================================================

@pytest.mark.parametrize("bias", [True, False])
def test_conv_step_equals_convolution_and_updates_in_place(bias):
    """causal_conv1d_step (the window form used when decoding) gives, token after token, what
    causal_conv1d gives for the whole input, and the same final window; it works in place at
    inference and leaves the state alone when autograd records. The oneDNN path (no segments) and
    the masked shift-and-add path (one segment) agree, and both equal the definition."""
    b, d, w, l = 2, 6, 4, 9
    x, weight = randn(b, l, d, seed=40), randn(d, 1, w, seed=41)
    bias_t = randn(d, seed=42) if bias else None
    state0 = randn(b, d, w, seed=43)
    ref, ref_state = causal_conv1d(x, weight, bias_t, None, state0)
    # the definition, with the window state0 as the w-1 inputs before token 0 (its last w-1)
    history = torch.cat([state0[..., 1:].transpose(1, 2), x], dim=1)
    assert_rel(ref, causal_conv_reference(history, weight[:, 0], bias_t)[:, w - 1:], 1e-15,
               "causal_conv1d vs its definition")
    one_segment = causal_conv1d(x, weight, bias_t, torch.zeros(b, l, dtype=torch.int32), state0)
    assert_rel(one_segment[0], ref, 1e-15, "masked path, one segment, vs oneDNN")  # 6.9e-17
    assert torch.equal(one_segment[1], ref_state)
    state, outs = state0.clone(), []
    with torch.no_grad():
        for t in range(l):
            y, new_state = causal_conv1d_step(x[:, t], weight, bias_t, state)
            assert new_state is state                 # updated in place, no new state allocated
            outs.append(y)
    assert_rel(torch.stack(outs, 1), ref, 1e-15, "stepped vs whole")   # measured: equal
    assert torch.equal(state, ref_state)
    xt = x[:, 0].clone().requires_grad_()
    state = state0.clone()
    y, new_state = causal_conv1d_step(xt, weight, bias_t, state)
    assert new_state is not state and torch.equal(state, state0)   # autograd keeps its window
    y.sum().backward()
    assert_rel(xt.grad, weight[:, 0, -1].expand(b, d), 1e-15, "dy/dx is the last tap")


@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_rmsnorm_gated_per_group(ngroups, norm_before_gate, gated):
    d = 12
    norm = RMSNormGated(d, eps=1e-5, norm_before_gate=norm_before_gate, group_size=d // ngroups,
                        dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(d, seed=31, scale=0.3))
    x = randn(3, 5, d, seed=32)
    x[..., :d // ngroups] *= 100.0           # very different scales per group
    z = randn(3, 5, d, seed=33) if gated else None
    expected = group_rmsnorm(x, z, norm.weight.detach(), ngroups, norm_before_gate)
    assert_rel(norm(x, z), expected, 4e-15, "RMSNormGated vs per-group formula")  # 3.3e-16
    assert_rel(rms_norm_gated(x, z, norm.weight, 1e-5, d // ngroups, norm_before_gate), expected,
               4e-15, "rms_norm_gated")                                           # 3.3e-16
    if ngroups > 1:   # scaling one group must not change the others (per-group statistics)
        x2 = x.clone()
        x2[..., :d // ngroups] *= 7.0
        out1, out2 = norm(x, z), norm(x2, z)
        assert_close(out2[..., d // ngroups:], out1[..., d // ngroups:], rtol=1e-15, atol=0,
                     what="the other groups")                  # measured: equal


@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_rmsnorm_gated_backward(ngroups, norm_before_gate, gated):
    """The norm's hand-written backward: float64 gradcheck of x, z and weight, and equal to
    autograd through the per-group formula (so the gradients that reach the block and the LM are
    those of the definition)."""
    d = 12
    x = randn(3, 5, d, seed=36).requires_grad_()
    z = randn(3, 5, d, seed=37).requires_grad_() if gated else None
    weight = (1 + randn(d, seed=38, scale=0.3)).requires_grad_()
    leaves = [t for t in (x, z, weight) if t is not None]

    def f(*args):
        x_, z_, w_ = (args[0], args[1], args[2]) if gated else (args[0], None, args[1])
        return rms_norm_gated(x_, z_, w_, 1e-5, d // ngroups, norm_before_gate)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)
    g = randn(3, 5, d, seed=39)
    got = torch.autograd.grad((f(*leaves) * g).sum(), leaves)
    want = torch.autograd.grad((group_rmsnorm(x, z, weight, ngroups, norm_before_gate) * g).sum(),
                               leaves)
    for a, b in zip(got, want):
        assert_rel(a, b, 7e-15, "gradient vs autograd through the formula")   # 6.2e-16


def test_rmsnorm_without_z_is_plain_rmsnorm_and_low_precision_stats_are_fp32():
    d = 16
    norm = RMSNormGated(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(d, seed=34, scale=0.3, dtype=torch.float32))
    x = randn(4, d, seed=35, dtype=torch.float32) * 3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.detach()
    assert_rel(norm(x), expected, 1e-6, "plain RMSNorm")       # measured 8.6e-8 (fp32)
    xb = x.bfloat16()
    out = RMSNormGated(d, eps=1e-5, dtype=torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    ref = xb.float() / torch.sqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_rel(out, ref, 1e-2, "bf16 RMSNorm")   # only the final rounding to bf16: 3.6e-3


# =========================================================================================
# ==== 5. the block vs oracles
# =========================================================================================

@pytest.mark.skipif(hf_mamba2 is None, reason="transformers not installed")
# measured: 2.1e-7 in float32, 4.1e-16 in float64
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-6), (F64, 5e-15)], ids=["f32", "f64"])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("seqlen", [1, 7, 16, 13], ids=lambda l: f"l{l}")
def test_matches_transformers_mixer(seqlen, ngroups, dtype, tol, quiet_transformers,
                                    monkeypatch):
    d_model, heads, headdim, d_state, chunk = 16, 8, 4, 5, 8   # 16 is a chunk multiple, 13 not
    hf_config = HFMamba2Config(hidden_size=d_model, num_heads=heads, head_dim=headdim,
                               n_groups=ngroups, state_size=d_state, expand=2, conv_kernel=4,
                               chunk_size=chunk, num_hidden_layers=1, layer_norm_epsilon=1e-5,
                               vocab_size=32)
    torch.manual_seed(1 + ngroups)
    mixer = randomize(hf_mamba2.Mamba2Mixer(hf_config, layer_idx=0), seed=7).eval()
    ours = Mamba2(Mamba2Config(d_model=d_model, d_state=d_state, headdim=headdim,
                               ngroups=ngroups, chunk_size=chunk))
    assert set(ours.state_dict()) == set(mixer.state_dict())
    ours.load_state_dict(mixer.state_dict())
    mixer.to(dtype)
    ours.to(dtype).eval()
    u = randn(3, seqlen, d_model, seed=seqlen, dtype=dtype)
    with torch.no_grad():
        if dtype == F64:
            with hf_oracle_in_float64(monkeypatch):
                expected = mixer(u)
        else:
            expected = mixer(u)
        got = ours(u)
    assert expected.dtype == got.dtype == dtype
    assert_rel(got, expected, tol, "block vs transformers Mamba2Mixer")


RECURRENCE_CONFIGS = {
    "base": dict(),
    "ngroups2": dict(ngroups=2),
    "ngroups4": dict(ngroups=4),
    "D_has_hdim": dict(D_has_hdim=True),
    "d_ssm<d_inner": dict(d_ssm=8),
    "d_ssm<d_inner,ngroups2": dict(d_ssm=8, ngroups=2),
    "norm_before_gate": dict(norm_before_gate=True, ngroups=2),
    "no_rmsnorm": dict(rmsnorm=False),
    "dt_limit": dict(dt_limit=(0.03, 0.08)),
    "bias,no_conv_bias": dict(bias=True, conv_bias=False),
    "d_conv3": dict(d_conv=3),
    "d_conv2": dict(d_conv=2),
    "learnable_init_states": dict(learnable_init_states=True),
    "everything": dict(d_ssm=8, ngroups=2, D_has_hdim=True, norm_before_gate=True, bias=True,
                       d_conv=3, dt_limit=(0.0, 0.06), learnable_init_states=True),
}


@pytest.mark.parametrize("cfg", list(RECURRENCE_CONFIGS.values()), ids=list(RECURRENCE_CONFIGS))
def test_matches_recurrence(cfg):
    block = make_block(**cfg)
    c = block.config
    b, l = 2, 11                             # 11 tokens: two full chunks of 4 and a partial one
    u = randn(l, b, c.d_model, seed=3).transpose(0, 1)   # a non-contiguous input, for good measure
    if c.dt_limit != (0.0, float("inf")):    # the clamp must bite for this case to mean anything
        with torch.no_grad():                # dt from ~0.002 to ~0.7 across the heads
            block.dt_bias.copy_(torch.linspace(-6, 0, c.nheads, dtype=F64))
        raw = F.softplus(block.in_proj(u)[..., -c.nheads:] + block.dt_bias)
        assert (raw > c.dt_limit[1]).any() and (c.dt_limit[0] == 0 or (raw < c.dt_limit[0]).any())
    h0 = randn(b, c.nheads, c.headdim, c.d_state, seed=4)
    with torch.no_grad():
        for init in (None, h0):
            expected, expected_state = reference_block(block, u, init)
            got, state = block(u, initial_states=init, return_final_states=True)
            assert state.shape == (b, c.nheads, c.headdim, c.d_state)
            # measured: 9.0e-16 and 8.1e-16
            assert_rel(got, expected, 1e-14, f"output, initial_states={init is not None}")
            assert_rel(state, expected_state, 1e-14,
                       f"final state, initial_states={init is not None}")


@pytest.mark.parametrize("dt_limit", [(0.05, 0.2), (0.0, 0.1), (0.1, float("inf"))])
def test_dt_limit_edges_equal_recurrence_with_clamped_dt(dt_limit):
    """dt_limit clamps softplus(dt + dt_bias): the block (chunked and token-by-token through a
    cache) equals the recurrence run with the clamped dt, and differs from the unclamped one."""
    block = make_block(seed=8, d_model=8, d_state=3, headdim=2, ngroups=2, chunk_size=5,
                       dt_limit=dt_limit)
    with torch.no_grad():
        block.dt_bias.copy_(torch.linspace(-6.0, 3.0, block.config.nheads, dtype=F64))
    u = randn(2, 23, 8, seed=9)
    c = block.config
    # the raw step sizes really cross the limits that are finite
    dt_raw = F.softplus(block.in_proj(u)[..., -c.nheads:] + block.dt_bias).detach()
    assert dt_raw.min() < dt_limit[0] or dt_limit[0] == 0.0
    assert dt_raw.max() > dt_limit[1] or math.isinf(dt_limit[1])
    assert c.d_inner == c.d_ssm
    with torch.no_grad():
        y, state = block(u, return_final_states=True)
        cache = block.allocate_inference_cache(2)
        steps = torch.cat([block(u[:, t:t + 1], cache=cache) for t in range(u.shape[1])], dim=1)
    y_ref, s_ref = reference_block(block, u)
    y_unclamped, _ = reference_block(block, u, clamp_dt=False)
    assert_rel(y, y_ref, 3e-15, "chunked output")                    # measured 2.0e-16
    assert_rel(state, s_ref, 2e-15, "chunked final state")           # measured 2.0e-16
    assert_rel(steps, y_ref, 4e-15, "stepped output")                # measured 3.5e-16
    assert_rel(cache.ssm_state, s_ref, 4e-15, "stepped final state") # measured 3.1e-16
    assert rel_err(y_unclamped, y_ref) > 1e-3


def test_block_chunk_size_independence():
    base = make_block(ngroups=2, chunk_size=64, seed=25)
    for l in (1, 5, 13, 67):
        u = randn(2, l, 8, seed=l)
        h0 = randn(2, 4, 4, 3, seed=l + 1)
        with torch.no_grad():
            ref = base(u, initial_states=h0, return_final_states=True)
            for chunk in (1, 3, 8):
                block = Mamba2(dataclasses.replace(base.config, chunk_size=chunk), dtype=F64)
                block.load_state_dict(base.state_dict())
                got = block(u, initial_states=h0, return_final_states=True)
                # measured: 3.6e-16 and 6.1e-16
                assert_rel(got[0], ref[0], 7e-15, f"output, l={l}, chunk {chunk} vs 64")
                assert_rel(got[1], ref[1], 7e-15, f"final state, l={l}, chunk {chunk} vs 64")


def test_block_gradcheck():
    block = make_block(d_model=4, d_state=2, headdim=2, ngroups=2, d_conv=3, seed=19)  # mem-eff
    names = ["dt_bias", "A_log", "D", "norm.weight", "conv1d.bias"]
    params = {k: v.detach().clone().requires_grad_() for k, v in block.named_parameters()
              if k in names}
    u = randn(1, 6, 4, seed=20).requires_grad_()
    h0 = randn(1, 4, 2, 2, seed=21).requires_grad_()
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1]])

    def f(u, h0, *values):
        return torch.func.functional_call(block, dict(zip(params, values)), (u,),
                                          dict(seq_idx=seq_idx, initial_states=h0))

    assert torch.autograd.gradcheck(f, (u, h0, *params.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(d_ssm=8, ngroups=2, D_has_hdim=True,
                                              norm_before_gate=True, bias=True),
                                 dict(rmsnorm=False, dt_limit=(0.0, 0.05))],
                         ids=["base", "mlp,groups", "no_norm"])
def test_fused_function_equals_block(cfg):
    block = make_block(**cfg)
    c = block.config
    u = randn(2, 13, 8, seed=38)
    h0 = randn(2, c.nheads, c.headdim, c.d_state, seed=39)
    seq_idx = packed_rows([6, 7], [13])
    kwargs = dict(chunk_size=c.chunk_size, dt_limit=c.dt_limit, headdim=c.headdim,
                  ngroups=c.ngroups, norm_before_gate=c.norm_before_gate,
                  rmsnorm_weight=block.norm.weight if c.rmsnorm else None, rmsnorm_eps=1e-5)
    with torch.no_grad():
        expected, expected_state = block(u, seq_idx=seq_idx, initial_states=h0,
                                         return_final_states=True)
        zxbcdt = block.in_proj(u)
        A = -torch.exp(block.A_log)
        got, state = mamba_split_conv1d_scan_combined(
            zxbcdt, block.conv1d.weight.squeeze(1), block.conv1d.bias, block.dt_bias, A, block.D,
            initial_states=h0, seq_idx=seq_idx, return_final_states=True,
            outproj_weight=block.out_proj.weight, outproj_bias=block.out_proj.bias, **kwargs)
        # measured: equal (the same function), here and below
        assert_rel(got, expected, 1e-15, "fused function vs block")
        assert_rel(state, expected_state, 1e-15, "fused function final state vs block")
        # without outproj_weight it returns the d_inner features before out_proj
        inner = mamba_split_conv1d_scan_combined(zxbcdt, block.conv1d.weight, block.conv1d.bias,
                                                 block.dt_bias, A, block.D, initial_states=h0,
                                                 seq_idx=seq_idx, **kwargs)
        assert inner.shape == (2, 13, c.d_inner)
        assert_rel(block.out_proj(inner), expected, 1e-15, "fused function without out_proj")


def test_fused_function_takes_headdim_from_D_of_shape_h_p():
    """Official Mamba2 calls the fused function with headdim=None when D_has_hdim: D (h, p)
    gives it. The result equals the block with D_has_hdim."""
    block = make_block(D_has_hdim=True)
    c = block.config
    u = randn(2, 9, 8)
    with torch.no_grad():
        want = block(u)
        got = mamba_split_conv1d_scan_combined(
            block.in_proj(u), block.conv1d.weight, block.conv1d.bias, block.dt_bias,
            -torch.exp(block.A_log), block.D.view(c.nheads, c.headdim), c.chunk_size,
            headdim=None, ngroups=c.ngroups, rmsnorm_weight=block.norm.weight, rmsnorm_eps=1e-5,
            norm_before_gate=False, outproj_weight=block.out_proj.weight)
    assert_close(got, want, atol=1e-15, what="fused function, headdim from D")   # equal


# =========================================================================================
# ==== 6. the cache
# =========================================================================================

CACHE_CONFIGS = {
    "base": dict(),
    "D_has_hdim": dict(D_has_hdim=True),          # official issue #887: step path, D (d_ssm,)
    "ngroups2": dict(ngroups=2),
    "ngroups2,d_ssm<d_inner": dict(ngroups=2, d_ssm=8, norm_before_gate=True),
    "d_conv2,bias": dict(d_conv=2, bias=True, conv_bias=False),
    "dt_limit,no_rmsnorm": dict(dt_limit=(0.02, 0.07), rmsnorm=False),
}


@pytest.mark.parametrize("cfg", list(CACHE_CONFIGS.values()), ids=list(CACHE_CONFIGS))
def test_cache_pieces_and_steps_match_whole(cfg):
    block = make_block(**cfg)
    c = block.config
    b, l = 2, 23
    u = randn(b, l, c.d_model, seed=5)
    with torch.no_grad():
        whole, whole_state = block(u, return_final_states=True)
        expected_conv = xbc_tail(block, u)
        for sizes in ([l], [1, 3, 5, 1, 6, 7], [9, 1, 1, 12], [1] * l):   # pieces cross chunks
            cache = InferenceCache.alloc(b, c, dtype=F64)
            got = run_in_pieces(block, u, sizes, cache)
            # measured: 5.0e-16, 4.8e-16 and 2.6e-16
            assert_rel(got, whole, 6e-15, f"output in pieces {sizes}")
            assert_rel(cache.ssm_state, whole_state, 5e-15, f"cache.ssm_state after {sizes}")
            # the last d_conv pre-conv inputs (in_proj of a piece may round differently: 1 ulp)
            assert_rel(cache.conv_state, expected_conv, 3e-15, f"cache.conv_state after {sizes}")


@PROPERTY
@given(cfg=block_configs(), data=st.data())
def test_block_pieces_through_cache_equal_whole(cfg, data):
    """Any split of a sequence into pieces (single tokens take the recurrent step) fed through one
    InferenceCache gives the whole-sequence outputs, final SSM state and conv state, for any span
    length; the whole forward equals the reference block."""
    l = data.draw(st.integers(1, 40), label="l")
    b = data.draw(st.integers(1, 2), label="b")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    span = data.draw(SPAN_LENS, label="SPAN_LEN")
    cuts = draw_cuts(data, l, 8, "pieces")
    block = make_block(seed=seed, **cfg)
    u = randn(b, l, cfg["d_model"], seed=seed + 1)
    default_span = dict(mamba2.SPAN_LEN)
    with torch.no_grad():
        with span_len(256):
            y_whole, s_whole = block(u, return_final_states=True)
            whole_cache = block.allocate_inference_cache(b)
            block(u, cache=whole_cache)
        with span_len(span):
            y_spans, s_spans = block(u, return_final_states=True)
            cache = block.allocate_inference_cache(b)
            points = [0] + cuts + [l]
            pieces = [block(u[:, s:e], cache=cache) for s, e in zip(points[:-1], points[1:])]
    assert mamba2.SPAN_LEN == default_span                  # the module setting was restored
    y_ref, s_ref = reference_block(block, u)
    # measured, the largest over 300 examples: 9.3e-16, 1.6e-15, 3.9e-15, 1.5e-15, 3.9e-15,
    # 1.8e-15; conv_state 4.4e-16 absolute
    assert_rel(y_whole, y_ref, 1e-14, "whole vs reference")
    assert_rel(s_whole, s_ref, 2e-14, "final state vs reference")
    assert_rel(y_spans, y_whole, 4e-14, "in spans vs whole")
    assert_rel(s_spans, s_whole, 2e-14, "final state in spans vs whole")
    assert_rel(torch.cat(pieces, dim=1), y_whole, 4e-14, "pieces through the cache vs whole")
    assert_rel(cache.ssm_state, s_whole, 2e-14, "cache.ssm_state vs whole")
    assert_close(cache.conv_state, whole_cache.conv_state, atol=5e-15,
                 what="cache.conv_state vs one call")


def test_multi_token_forward_continues_from_stepped_cache():
    """Official issue #641: a chunked multi-token call must start from the state a step-by-step
    prefill left."""
    block = make_block(ngroups=2)
    u = randn(2, 27, 8, seed=6)
    with torch.no_grad():
        whole = block(u)
        cache = InferenceCache.alloc(2, block.config, dtype=F64)
        got = run_in_pieces(block, u, [1] * 10 + [17], cache)
    assert_rel(got, whole, 4e-15, "10 steps then 17 tokens at once")     # measured 3.9e-16


def test_cache_long_prefill_then_steps():
    """A cached prompt longer than one CPU processing span (SPAN_LEN), then single-token steps."""
    block = make_block(d_model=4, headdim=2, d_state=2, chunk_size=16, ngroups=2)
    l = CPU_SPAN + 40
    u = randn(2, l, 4, seed=47)
    with torch.no_grad():
        whole, whole_state = block(u, return_final_states=True)
        cache = InferenceCache.alloc(2, block.config, dtype=F64)
        got = run_in_pieces(block, u, [l - 5] + [1] * 5, cache)
    assert_rel(got, whole, 2e-15, "long cached prefill + steps")         # measured 1.2e-16
    assert_rel(cache.ssm_state, whole_state, 4e-15, "ssm_state")         # measured 3.6e-16
    assert_rel(cache.conv_state, xbc_tail(block, u), 2e-15, "conv_state")  # 1.2e-16


def test_block_halves_need_conv_history_which_cache_carries():
    block = make_block()
    u = randn(2, 14, 8, seed=17)
    with torch.no_grad():
        whole = block(u)
        first, mid = block(u[:, :6], return_final_states=True)
        # initial_states carries the SSM state only: the conv window of the second half starts
        # empty, so its first tokens differ from the whole-sequence run.
        second_no_conv = block(u[:, 6:], initial_states=mid)
        assert rel_err(second_no_conv[:, :1], whole[:, 6:7]) > 1e-3
        # A cache carries both the conv window and the SSM state.
        cache = InferenceCache.alloc(2, block.config, dtype=F64)
        block(u[:, :6], cache=cache)
        assert_close(cache.ssm_state, mid, atol=1e-15, what="cache.ssm_state")   # equal
        second = block(u[:, 6:], cache=cache)
    assert_rel(torch.cat([first, second], dim=1), whole, 1e-15, "two halves, cache")  # 3.8e-17


@pytest.mark.parametrize("learnable", [False, True], ids=["alloc", "learnable_init_states"])
def test_cache_reset_gives_identical_rerun(learnable):
    """reset() must bring a cache back to where it started: zeros for InferenceCache.alloc, the
    learned init_states for a cache from allocate_inference_cache of a block with
    learnable_init_states."""
    block = make_block(learnable_init_states=learnable)
    u = randn(2, 9, 8, seed=7)
    cache = (block.allocate_inference_cache(2) if learnable
             else InferenceCache.alloc(2, block.config, dtype=F64))
    with torch.no_grad():
        first = run_in_pieces(block, u, [4, 1, 4], cache)
        first_states = cache.conv_state.clone(), cache.ssm_state.clone()
        assert cache.reset() is cache
        assert not cache.conv_state.any()
        second = run_in_pieces(block, u, [4, 1, 4], cache)
        fresh = run_in_pieces(block, u, [4, 1, 4], block.allocate_inference_cache(2))
    assert torch.equal(first, fresh)
    assert torch.equal(first, second), "re-run after reset() differs from the first run"
    assert torch.equal(cache.conv_state, first_states[0])
    assert torch.equal(cache.ssm_state, first_states[1])


@pytest.mark.parametrize("sizes", [[3, 5], [3, 1, 1, 3], [1] * 8], ids=["chunks", "mixed", "steps"])
def test_cached_forward_with_grad_enabled(sizes):
    """Decoding with a cache outside torch.no_grad() (grad mode is the default) must give the
    same outputs."""
    block = make_block(ngroups=2)
    u = randn(2, 8, 8, seed=48)
    with torch.no_grad():
        whole = block(u)
    cache = InferenceCache.alloc(2, block.config, dtype=F64)
    got = run_in_pieces(block, u, sizes, cache)
    assert_rel(got, whole, 3e-15, f"grad-mode cached pieces {sizes}")    # measured 2.5e-16


def test_grad_mode_step_on_a_fresh_cache_equals_the_no_grad_step():
    """A single-token call on a fresh cache in grad mode (the default outside torch.no_grad) gives
    the no-grad result, an output autograd can differentiate, and leaves the same conv and SSM
    states in the cache. learnable_init_states makes the fresh ssm_state non-zero, so a wrong
    start or a partial update would show."""
    block = make_block(learnable_init_states=True)
    u = randn(2, 1, 8, seed=50)
    with torch.no_grad():
        ref_cache = block.allocate_inference_cache(2)
        expected = block(u, cache=ref_cache)
    cache = block.allocate_inference_cache(2)
    assert cache.ssm_state.any()
    got = block(u, cache=cache)
    assert got.requires_grad
    assert_rel(got, expected, 1e-15, "grad-mode step")                  # measured: equal
    assert_rel(cache.ssm_state, ref_cache.ssm_state, 1e-15, "ssm_state after a grad-mode step")
    assert torch.equal(cache.conv_state, ref_cache.conv_state)
    assert not cache.ssm_state.requires_grad and not cache.conv_state.requires_grad


def test_cached_outputs_can_be_backpropagated():
    """The outputs of successful cached calls made in grad mode must be differentiable without
    autograd errors (a later call must not invalidate the graph of an earlier one)."""
    block = make_block(ngroups=2)
    u = randn(2, 8, 8, seed=48)
    cache = InferenceCache.alloc(2, block.config, dtype=F64)
    got = run_in_pieces(block, u, [3, 5], cache)
    got.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_cache_is_truncated_backpropagation_through_time():
    """Gradients stop at each cached call: the second piece's output does not depend (in the
    graph) on the first piece's input, while its value does."""
    block = make_block(seed=36)
    u = randn(1, 10, 8, seed=37).requires_grad_()
    cache = block.allocate_inference_cache(1)
    block(u[:, :6], cache=cache)
    second = block(u[:, 6:], cache=cache)
    (g,) = torch.autograd.grad(second.sum(), u)
    assert not g[:, :6].any() and g[:, 6:].any()
    with torch.no_grad():
        assert not torch.equal(second, block(u[:, 6:]))


def test_returned_final_state_is_not_overwritten_by_later_calls():
    """return_final_states with a cache returns the state after the call; a later call on the same
    cache must not change a state returned earlier, whether the earlier call had several tokens or
    one (step path)."""
    block = make_block()
    u = randn(2, 6, 8, seed=49)
    with torch.no_grad():
        for first in (3, 1):
            cache = InferenceCache.alloc(2, block.config, dtype=F64)
            _, state = block(u[:, :first], cache=cache, return_final_states=True)
            kept = state.clone()
            block(u[:, first:first + 1], cache=cache)
            assert torch.equal(state, kept), f"state returned by a {first}-token call changed"


def test_cache_alloc_validation():
    c = Mamba2Config(d_model=8, d_state=3, headdim=4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            InferenceCache.alloc(bad, c)
    cache = InferenceCache.alloc(3, c, dtype=F64)
    assert cache.conv_state.shape == (3, c.conv_dim, c.d_conv)
    assert cache.ssm_state.shape == (3, 4, 4, 3)
    assert cache.ssm_state.dtype == F64 and cache.batch_size == 3


# =========================================================================================
# ==== 7. packing
# =========================================================================================

def test_seq_idx_matches_sequences_alone():
    block = make_block(ngroups=2)                 # d_conv 4, chunk 4
    # row 0: segments shorter than d_conv, a length-1 segment, one crossing two chunk boundaries;
    # row 1: different layout and non-consecutive ids starting above 0.
    seq_idx = torch.stack([seq_idx_from_lengths([2, 1, 9, 1, 6]),
                           seq_idx_from_lengths([5, 3, 1, 1, 9], first=3, gaps=2)]).int()
    u = randn(2, 19, 8, seed=9)
    packed_vs_alone(block, u, seq_idx=seq_idx, tol=7e-15)               # measured 6.1e-16
    packed_vs_alone(block, u, seq_idx=seq_idx, initial_states=randn(2, 4, 4, 3, seed=10),
                    tol=7e-15)


def test_cu_seqlens_matches_sequences_alone():
    block = make_block(d_conv=3, D_has_hdim=True)
    cu = torch.tensor([0, 3, 4, 15, 17, 21])
    u = randn(1, 21, 8, seed=11)
    packed_vs_alone(block, u, cu_seqlens=cu, tol=3e-15)                 # measured 2.8e-16
    packed_vs_alone(block, u, cu_seqlens=cu, initial_states=randn(1, 4, 4, 3, seed=12),
                    tol=3e-15)
    with torch.no_grad():   # cu_seqlens is just another spelling of seq_idx
        by_ids = block(u, seq_idx=packed_rows([3, 1, 11, 2, 4]))
        assert torch.equal(block(u, cu_seqlens=cu), by_ids)


@settings(PROPERTY, max_examples=40)
@given(cfg=block_configs(), data=st.data())
def test_block_packed_equals_separate_runs(cfg, data):
    """Sequences packed along the length (seq_idx, or cu_seqlens for batch 1) give exactly what
    each gives alone, for any block options, chunk and span length: initial_states apply to the
    first segment of a row, every other segment starts from the learned init_states (or zeros);
    the final state is the last segment's; and the packed call equals the reference block with
    segment resets."""
    l = data.draw(st.integers(1, 40), label="l")
    b = data.draw(st.integers(1, 2), label="b")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    span = data.draw(SPAN_LENS, label="SPAN_LEN")
    with_h0 = data.draw(st.booleans(), label="h0")
    block = make_block(seed=seed, **cfg)
    c = block.config
    u = randn(b, l, c.d_model, seed=seed + 1)
    h0 = randn(b, c.nheads, c.headdim, c.d_state, seed=seed + 2) if with_h0 else None
    layouts = [lengths_from_cuts(l, draw_cuts(data, l, 5, "cuts")) for _ in range(b)]
    gaps = [data.draw(st.lists(st.integers(1, 3), min_size=len(x), max_size=len(x)),
                      label="gaps") for x in layouts]
    seq_idx = torch.stack([seq_idx_from_lengths(x, gaps=gp) for x, gp in zip(layouts, gaps)])
    with span_len(span):
        # measured, the largest over 300 examples: 2.1e-15 here, 1.6e-15 and 1.7e-15 below
        packed_vs_alone(block, u, seq_idx=seq_idx, initial_states=h0, tol=3e-14)
        with torch.no_grad():
            y, final = block(u, seq_idx=seq_idx, initial_states=h0, return_final_states=True)
            if b == 1:
                cu = torch.tensor([0] + list(torch.tensor(layouts[0]).cumsum(0)),
                                  dtype=torch.int32)
                y_cu, final_cu = block(u, cu_seqlens=cu, initial_states=h0,
                                       return_final_states=True)
                assert_rel(y_cu, y, 1e-15, "cu_seqlens vs seq_idx")          # measured: equal
                assert_rel(final_cu, final, 1e-15, "cu_seqlens vs seq_idx, final state")
    y_ref, s_ref = reference_block(block, u, initial_states=h0, seq_idx=seq_idx)
    assert_rel(y, y_ref, 2e-14, "packed vs the reference block")
    assert_rel(final, s_ref, 2e-14, "packed final state vs the reference block")


def test_cache_pieces_with_seq_idx_match_packed_whole():
    """A packed batch fed through a cache in pieces equals the packed whole. No piece starts a
    segment (the cache, like initial_states, continues the first segment of a piece), but pieces
    start right after a segment change, so the conv window handed over must not carry inputs of
    the earlier segment."""
    block = make_block(ngroups=2)
    seq_idx = packed_rows([5, 2, 5, 7], [1, 9, 2, 7])
    u = randn(2, 19, 8, seed=46)
    with torch.no_grad():
        whole, whole_state = block(u, seq_idx=seq_idx, return_final_states=True)
        whole_cache = InferenceCache.alloc(2, block.config, dtype=F64)
        block(u, seq_idx=seq_idx, cache=whole_cache)
        cache, outs, start = InferenceCache.alloc(2, block.config, dtype=F64), [], 0
        for size in (3, 3, 2, 3, 4, 4):
            outs.append(block(u[:, start:start + size], seq_idx=seq_idx[:, start:start + size],
                              cache=cache))
            start += size
    # measured: 2.5e-16, 1.9e-16, equal, 1.1e-16, equal
    assert_rel(torch.cat(outs, dim=1), whole, 3e-15, "packed output in cached pieces")
    assert_rel(cache.ssm_state, whole_state, 2e-15, "ssm_state")
    assert_rel(whole_cache.ssm_state, whole_state, 1e-15, "ssm_state of one cached call")
    assert_rel(cache.conv_state, whole_cache.conv_state, 2e-15, "conv_state")
    # only the last segment's inputs survive in the conv window (both rows end with 7 tokens)
    assert_rel(whole_cache.conv_state, xbc_tail(block, u), 1e-15, "conv_state of a packed call")


def test_seq_idx_across_long_input_spans():
    """On CPU a long input runs in spans of SPAN_LEN tokens: segments that start exactly at a span
    boundary or cross one must still be isolated, and the result must not depend on the span
    length."""
    block = make_block(d_model=4, headdim=2, d_state=2, chunk_size=16)
    l = CPU_SPAN + 44
    seq_idx = packed_rows([100, CPU_SPAN - 100, 44],     # a segment starts exactly at the boundary
                          [CPU_SPAN - 6, 10, 40],        # a segment crosses it
                          [CPU_SPAN - 5, 3, 46])         # a 3-token segment ends 2 tokens before
    #                                                      it: the conv window handed across spans
    #                                                      three segments
    u = randn(3, l, 4, seed=13)
    packed_vs_alone(block, u, seq_idx=seq_idx, initial_states=randn(3, 4, 2, 2, seed=14),
                    tol=5e-15)                                           # measured 4.4e-16
    with torch.no_grad():
        default = block(u, seq_idx=seq_idx, return_final_states=True)
        plain = block(u, return_final_states=True)
        with span_len(None):                          # one pass over the whole sequence
            single = block(u, seq_idx=seq_idx, return_final_states=True)
            single_plain = block(u, return_final_states=True)
    for a, b_, what in ((default, single, "seq_idx"), (plain, single_plain, "no seq_idx")):
        # measured: equal
        assert_rel(a[0], b_[0], 1e-15, f"output, in spans vs single pass, {what}")
        assert_rel(a[1], b_[1], 1e-15, f"final state, in spans vs single pass, {what}")


# =========================================================================================
# ==== 8. hostile values: non-finite inputs, overflow, extreme decay
# =========================================================================================

@settings(PROPERTY, max_examples=30)
@given(data=st.data())
def test_non_finite_values_never_reach_earlier_tokens_or_other_segments(data):
    """An output at t depends only on tokens <= t of its own segment and row, whatever the later
    tokens hold: NaN or ±inf planted anywhere leaves every other output bit for bit as it was,
    and the outputs it does reach are non-finite (the honest result)."""
    l = data.draw(st.integers(1, 24), label="l")
    chunk = data.draw(st.sampled_from([1, 3, 4, 8]), label="chunk")
    learnable = data.draw(st.booleans(), label="learnable")
    packed = data.draw(st.booleans(), label="packed")
    block = make_block(seed=data.draw(st.integers(0, 99)), chunk_size=chunk, ngroups=2,
                       learnable_init_states=learnable)
    u = randn(2, l, 8, seed=l)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(l - 1, 1)), max_size=3))) \
        if packed and l > 1 else []
    seq_idx = None
    if packed:
        ids = [sum(t >= c for c in cuts) for t in range(l)]
        seq_idx = torch.tensor([ids, [0] * l])
    row, t = data.draw(st.integers(0, 1)), data.draw(st.integers(0, l - 1))
    channel = data.draw(st.integers(0, 7))
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    span = data.draw(st.sampled_from([1024, 5]))
    with torch.no_grad(), span_len(span):
        clean = block(u, seq_idx=seq_idx)
        dirty = block(plant(u, row, t, channel, value), seq_idx=seq_idx)
    seg = None if seq_idx is None else seq_idx[row]
    reached = torch.zeros(2, l, dtype=torch.bool)
    for s in range(l):
        reached[row, s] = s >= t and (seg is None or seg[s] == seg[t])
    assert torch.equal(dirty[~reached], clean[~reached])
    assert not torch.isfinite(dirty[reached]).any()


def test_non_finite_at_the_scan_stays_in_its_head_and_after_its_token():
    x, dt = randn(1, 13, 4, 3), randn(1, 13, 4).abs() + 0.1
    A, B, C = -randn(4).abs() - 0.1, randn(1, 13, 2, 5), randn(1, 13, 2, 5)
    clean, s_clean = ssd(x, dt, A, B, C, 4, return_final_states=True)
    x2 = x.clone()
    x2[0, 6, 1, 2] = math.nan
    dirty, s_dirty = ssd(x2, dt, A, B, C, 4, return_final_states=True)
    assert torch.equal(dirty[:, :6], clean[:, :6])
    assert torch.equal(dirty[:, :, [0, 2, 3]], clean[:, :, [0, 2, 3]])
    assert not torch.isfinite(dirty[0, 6:, 1]).any() and not torch.isfinite(s_dirty[0, 1]).any()
    assert torch.equal(s_dirty[0, [0, 2, 3]], s_clean[0, [0, 2, 3]])
    for name, t in (("dt", dt), ("B", B), ("C", C)):     # the other inputs: the same rule
        bad = t.clone()
        bad.view(-1)[bad[0, :7].numel() - 1] = math.inf   # the last entry of token 6
        y = ssd(**{**dict(x=x, dt=dt, A=A, B=B, C=C), name: bad}, chunk_size=4)
        assert torch.equal(y[:, :6], clean[:, :6]), name


def test_fp16_overflow_at_the_last_token_keeps_earlier_tokens():
    block = make_block(seed=21, dtype=torch.float16, d_model=16, d_state=4, headdim=8,
                       chunk_size=8)
    u = randn(1, 12, 16, seed=22, dtype=torch.float16)
    with torch.no_grad():
        clean = block(u)
        loud = u.clone()
        loud[0, -1] = 6e4                                  # in_proj overflows fp16
        out = block(loud)
        assert not torch.isfinite(block.in_proj(loud)[0, -1]).all()
    assert torch.equal(out[:, :-1], clean[:, :-1])


def test_very_negative_A_finite_outputs_and_gradients():
    """A_log = 10 (A = -22026): every decay underflows to 0 in fp32. Outputs (chunked, packed,
    stepped) and all gradients stay finite (no inf - inf or 0 * inf anywhere), and the output
    equals the float64 reference, which is then memoryless: h_t = dt_t x_t B_t^T."""
    block = make_block(seed=10, dtype=torch.float32, d_model=16, d_state=4, headdim=8,
                       chunk_size=8)
    with torch.no_grad():
        block.A_log.fill_(10.0)
        block.dt_bias[0] = 4.0                     # one head with a large dt: dt * A ~ -1e5
    u = randn(2, 37, 16, seed=11, dtype=torch.float32).requires_grad_()
    seq_idx = torch.tensor([[0] * 10 + [1] * 27, [0] * 3 + [2] * 30 + [3] * 4])
    h0 = randn(2, block.config.nheads, 8, 4, seed=12, dtype=torch.float32).requires_grad_()
    block.train()
    y, final = block(u, seq_idx=seq_idx, initial_states=h0, return_final_states=True)
    ((y * randn(*y.shape, seed=13, dtype=torch.float32)).sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    grads = {"u": u.grad, "h0": h0.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
    y_ref, _ = reference_block(block, u, initial_states=h0, seq_idx=seq_idx)
    assert_rel(y, y_ref, 3e-6, "fp32 vs the float64 reference")          # measured 2.4e-7
    with torch.no_grad():
        cache = block.allocate_inference_cache(2)
        steps = torch.cat([block(u[:, t:t + 1].detach(), cache=cache) for t in range(12)], dim=1)
        y_plain = block(u[:, :12].detach())
    assert torch.isfinite(steps).all() and torch.isfinite(cache.ssm_state).all()
    assert_rel(steps, y_plain, 3e-6, "stepped vs chunked")               # measured 2.7e-7


def test_long_sequence_fp32_with_extreme_decay_is_finite_and_memoryless():
    block = make_block(dtype=torch.float32, d_model=4, d_state=4, headdim=4, chunk_size=64,
                       seed=26)
    with torch.no_grad():
        block.A_log.fill_(10.0)        # A = -22026
        block.dt_bias.fill_(10.0)      # dt ~ 10: dt*A ~ -2e5 per token, exp underflows to 0
    l, w = 2 ** 16, block.config.d_conv
    u = randn(1, l, 4, seed=27, dtype=torch.float32)
    with torch.no_grad():
        y, state = block(u, return_final_states=True)
        assert torch.isfinite(y).all() and torch.isfinite(state).all()
        # With the state wiped at every token, y_t depends on the last d_conv inputs only: a short
        # run over the tail reproduces the end of the long run once its conv window is full.
        tail = block(u[:, -16:])
    assert_rel(y[:, -16 + w - 1:], tail[:, w - 1:], 1e-6,                # measured: equal
               "end of a 65536-token run vs a 16-token run")


# =========================================================================================
# ==== 9. higher-order gradients and explicit states
# =========================================================================================

def test_second_derivatives_through_scan_norm_and_loss():
    b, l, h, p, g, n = 1, 7, 2, 2, 1, 2
    leaves = [randn(b, l, h, p, seed=1), randn(b, l, h, seed=2).abs() + 0.1,
              -randn(h, seed=3).abs() - 0.2, randn(b, l, g, n, seed=4), randn(b, l, g, n, seed=5),
              randn(h, seed=6), randn(b, h, p, n, seed=7), randn(h, p, n, seed=8)]
    leaves = [t.requires_grad_() for t in leaves]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])

    def scan(x, dt, A, B, C, D, h0, S0):
        return mamba2._ssd(x, dt, A, B, C, 3, D, h0, seq_idx, S0)

    assert torch.autograd.gradgradcheck(scan, leaves)
    x, z, w = randn(3, 8, seed=9), randn(3, 8, seed=10), 1 + randn(8, seed=11) * 0.3
    for gate_first in (False, True):
        assert torch.autograd.gradgradcheck(
            lambda x, z, w: rms_norm_gated(x, z, w, 1e-5, 4, gate_first),
            [t.clone().requires_grad_() for t in (x, z, w)])
    hid, wt = randn(5, 4, seed=12).requires_grad_(), randn(9, 4, seed=13).requires_grad_()
    targets = torch.tensor([1, -100, 3, 0, 6])
    assert torch.autograd.gradgradcheck(
        lambda a, b: mamba2._LinearCrossEntropy.apply(a, b, targets, -100, 7), [hid, wt])


@pytest.mark.parametrize("mem_eff", [True, False])
def test_hessian_vector_product_of_the_block_equals_the_reference(mem_eff):
    """grad(grad(loss) · v) through the block (memory-efficient checkpoint or not) equals the same
    through the reference block (plain autograd, no custom Functions anywhere)."""
    block = make_block(seed=25, use_mem_eff_path=mem_eff, learnable_init_states=True)
    u = randn(2, 9, 8, seed=26).requires_grad_()
    v = randn(2, 9, 8, seed=27)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])

    def hvp(run):
        (gu,) = torch.autograd.grad(run(u).square().sum(), u, create_graph=True)
        return torch.autograd.grad((gu * v).sum(), u)[0]

    got = hvp(lambda x: block(x, seq_idx=seq_idx))
    want = hvp(lambda x: reference_block(block, x, seq_idx=seq_idx)[0])
    # measured: 7.9e-15 absolute, 3.0e-14 relative
    assert_close(got, want, rtol=2e-13, atol=2e-14, what="Hessian-vector product")


def test_explicit_states_carry_gradients_like_the_whole_sequence():
    """ssd in pieces through initial_states -> return_final_states has the whole sequence's
    gradients."""
    x, dt = randn(2, 17, 4, 3, seed=30), randn(2, 17, 4, seed=31).abs() + 0.1
    A = -randn(4, seed=32).abs() - 0.1
    B, C = randn(2, 17, 2, 5, seed=33), randn(2, 17, 2, 5, seed=34)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    w = randn(2, 17, 4, 3, seed=35)
    whole = ssd(x, dt, A, B, C, 4)
    g_whole = torch.autograd.grad((whole * w).sum(), leaves)
    state, pieces = None, []
    for s, e in [(0, 5), (5, 6), (6, 17)]:
        y, state = ssd(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], 4, initial_states=state,
                       return_final_states=True)
        pieces.append(y)
    g_pieces = torch.autograd.grad((torch.cat(pieces, 1) * w).sum(), leaves)
    for name, a, b in zip("x dt A B C".split(), g_pieces, g_whole):
        # measured: 2.2e-15 absolute, 5.9e-14 relative
        assert_close(a, b, rtol=4e-13, atol=4e-15, what=f"d/d{name}")


# =========================================================================================
# ==== 10. memory-efficient path, long inputs, low precision
# =========================================================================================

def test_mem_eff_path_same_outputs_and_gradients():
    cfg = dict(ngroups=2, d_ssm=8, learnable_init_states=True, bias=True)
    plain, eff = make_block(use_mem_eff_path=False, **cfg), make_block(use_mem_eff_path=True, **cfg)
    eff.load_state_dict(plain.state_dict())
    l = CPU_SPAN + 20                 # long enough to run in more than one span on CPU
    u = randn(2, l, 8, seed=22)
    seq_idx = packed_rows([l - 30, 30], [10, l - 10])
    results = []
    for block in (plain, eff):
        x = u.clone().requires_grad_()
        y, state = block(x, seq_idx=seq_idx, return_final_states=True)
        (y * randn(*y.shape, seed=23)).sum().add(state.square().sum()).backward()
        results.append((y, state, x.grad, {k: p.grad for k, p in block.named_parameters()}))
    (y0, s0, gx0, g0), (y1, s1, gx1, g1) = results
    assert torch.equal(y0, y1) and torch.equal(s0, s1)
    assert torch.equal(gx0, gx1)
    assert set(g0) == set(g1)
    for name in g0:
        assert g0[name] is not None and torch.equal(g0[name], g1[name]), name


def test_mem_eff_path_saves_memory():
    # Measured with l=2048, d_model=16, d_state=16, headdim=8 (torch 2.13, CPU): the plain path
    # saves ~3.2 MB (the in_proj output, conv output, scan inputs and chunk states, norm
    # inputs...), the memory-efficient path ~0.14 MB: only each span's input u and the weights
    # (ratio 0.044, and 0.995x the minimum below). Two bounds with margin: under 60% of the plain
    # path (the issue's requirement) and at most 1.1x what the checkpointed path fundamentally
    # needs (u and the parameters; the in_proj output is recomputed too).
    cfg = dict(d_model=16, d_state=16, headdim=8, chunk_size=64)
    plain = make_block(dtype=torch.float32, use_mem_eff_path=False, **cfg)
    eff = make_block(dtype=torch.float32, use_mem_eff_path=True, **cfg)
    u = randn(1, 2048, 16, seed=24, dtype=torch.float32).requires_grad_()
    plain_bytes, eff_bytes = saved_bytes(plain, u), saved_bytes(eff, u)
    needed = (u.numel() + sum(p.numel() for p in eff.parameters())) * 4
    assert eff_bytes < 0.6 * plain_bytes, (eff_bytes, plain_bytes)
    assert eff_bytes <= 1.1 * needed, (eff_bytes, needed)


def test_block_memory_grows_linearly_in_one_pass():
    block = make_block(dtype=torch.float32, d_model=4, d_state=2, headdim=2, chunk_size=4,
                       seed=29)
    sizes = {}
    with span_len(None):                  # no spans on CPU: the scan sees the whole input
        for l in (1024, 4096):
            u = randn(1, l, 4, seed=30, dtype=torch.float32)
            with torch.no_grad(), TensorSizes() as sizes[l]:
                block(u)
    assert sizes[4096].largest <= 4.5 * sizes[1024].largest, (sizes[1024].largest,
                                                               sizes[4096].largest)
    assert sizes[4096].total <= 4.5 * sizes[1024].total, (sizes[1024].total, sizes[4096].total)


def test_million_tokens_fp32_finite_and_equal_to_two_halves_through_cache():
    """1,000,000 tokens through a tiny fp32 block: finite, and the same (up to fp32 rounding) as
    the two halves run one after the other through an InferenceCache. (Spans of 2^17 tokens keep
    the Python overhead low; the result does not depend on the span length, see the property
    tests.)"""
    block = make_block(seed=3, dtype=torch.float32, d_model=16, d_state=4, headdim=8, expand=1,
                       chunk_size=32)
    L, half = 1_000_000, 500_000
    u = randn(1, L, 16, seed=4, dtype=torch.float32)
    with torch.no_grad(), span_len(2 ** 17):
        y, final = block(u, return_final_states=True)
        assert torch.isfinite(y).all() and torch.isfinite(final).all()
        cache = block.allocate_inference_cache(1)
        y1 = block(u[:, :half], cache=cache)
        y2 = block(u[:, half:], cache=cache)
        fresh = block(u[:, half:half + 64])           # the second half without the carried state
    assert y.std() > 0.05
    scale = y.abs().max().item()
    # Measured: bitwise equal (the halves' chunk boundaries fall on the whole run's); the
    # tolerance only allows for a different order of fp32 rounding, far below the effect of a
    # lost or doubled state.
    assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-6, atol=1e-7 * scale, what="output")
    assert_close(cache.ssm_state, final, rtol=1e-6, atol=1e-7 * final.abs().max().item(),
                 what="final state")
    # the comparison is sensitive to the carried state: starting the second half afresh differs
    assert (fresh[:, :8] - y[:, half:half + 8]).abs().max() > 1e-3 * scale


def test_bfloat16_forward_close_to_float32():
    cfg = dict(dtype=torch.float32, d_model=32, d_state=8, headdim=8, ngroups=2, chunk_size=16,
               seed=42)
    block32, block16 = make_block(**cfg), make_block(**cfg)
    block16.to(torch.bfloat16)
    with torch.no_grad():   # give the float32 reference the very same (bf16-rounded) weights, input
        block32.load_state_dict({k: v.float() for k, v in block16.state_dict().items()})
    u = randn(2, 40, 32, seed=43, dtype=torch.float32).bfloat16()
    with torch.no_grad():
        y16, s16 = block16(u, return_final_states=True)
        y32, s32 = block32(u.float(), return_final_states=True)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    # bf16 keeps 8 bits of mantissa (rounding 2^-9 ~ 2e-3 per op); in_proj, conv, gating and
    # out_proj each round, the scan itself runs in fp32. Measured (norm-wise): output 4.1e-3,
    # final state 2.9e-3; the bounds leave a 10x margin.
    assert_norm_rel(y16, y32, 4e-2, "bf16 output")
    assert_norm_rel(s16, s32, 3e-2, "bf16 final state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision_forward_backward_close_to_fp32(dtype):
    """bf16 / fp16 autocast on the CPU: forward and backward finite, every gradient non-zero, and
    close to fp32 (the scan runs in fp32 either way, only the projections and the gating run in
    low precision; bf16 keeps 8 mantissa bits, fp16 11).

    Measured norm-relative errors (this config, torch 2.13 CPU): bf16 output 5.7e-3, gradients
    3.1e-3 (D) to 1.9e-2 (A_log); fp16 output 6.9e-4, gradients 6.1e-4 to 5.5e-3 (dt_bias). The
    bounds, per dtype: about 10x (bf16 5x) the largest."""
    out_tol, grad_tol = {torch.bfloat16: (3e-2, 1e-1), torch.float16: (7e-3, 6e-2)}[dtype]
    block = make_block(seed=5, dtype=torch.float32, d_model=32, d_state=8, headdim=8, ngroups=2,
                       chunk_size=16)
    u = randn(2, 48, 32, seed=6, dtype=torch.float32)
    w = randn(2, 48, 32, seed=7, dtype=torch.float32)

    def run(autocast):
        block.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = block(x)
        (y.float() * w).sum().backward()
        grads = {"u": x.grad.clone()}
        grads.update({n: p.grad.clone() for n, p in block.named_parameters()})
        return y, grads

    y32, g32 = run(False)
    y16, g16 = run(True)
    assert y16.dtype == dtype and y32.dtype == torch.float32
    assert torch.isfinite(y16.float()).all()
    assert_norm_rel(y16, y32, out_tol, "output")
    assert set(g16) == set(g32)
    for name, g in g16.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert_norm_rel(g, g32[name], grad_tol, f"gradient of {name}")


# =========================================================================================
# ==== 11. config and initialisation
# =========================================================================================

def test_config_official_defaults():
    c = Mamba2Config(d_model=768)
    expected = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, ngroups=1,
                    A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                    dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")),
                    bias=False, conv_bias=True, chunk_size=256, use_mem_eff_path=True,
                    learnable_init_states=False)
    assert {k: getattr(c, k) for k in expected} == expected
    # mamba2-130m shapes
    assert (c.d_inner, c.d_ssm, c.nheads, c.conv_dim, c.d_in_proj) == (1536, 1536, 24, 1792, 3352)
    block = Mamba2(Mamba2Config(d_model=768, d_state=128, headdim=64, chunk_size=256),
                   device="meta")
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {"in_proj.weight": (3352, 768), "conv1d.weight": (1792, 1, 4),
                      "conv1d.bias": (1792,), "dt_bias": (24,), "A_log": (24,), "D": (24,),
                      "norm.weight": (1536,), "out_proj.weight": (768, 1536)}


def test_config_d_ssm_derived_sizes():
    c = Mamba2Config(d_model=64, d_state=16, headdim=16, d_ssm=64, ngroups=2)
    assert (c.d_inner, c.d_ssm, c.nheads, c.d_mlp) == (128, 64, 4, 64)
    assert c.conv_dim == 64 + 2 * 2 * 16
    assert c.d_in_proj == 2 * 128 + 2 * 2 * 16 + 4


def test_official_keyword_form():
    block = Mamba2(d_model=64, d_state=16, d_conv=4, expand=2, headdim=16)
    c = block.config
    assert (c.d_model, c.d_state, c.d_conv, c.expand, c.headdim, c.nheads) == (64, 16, 4, 2, 16, 8)
    twin = Mamba2(Mamba2Config(d_model=64, d_state=16, d_conv=4, expand=2, headdim=16))
    twin.load_state_dict(block.state_dict())
    u = randn(1, 5, 64, seed=36, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(block(u), twin(u))
    with pytest.raises(TypeError, match="not both"):
        Mamba2(Mamba2Config(d_model=64), d_state=16)
    assert Mamba2(64, d_state=16, headdim=16).config == c   # d_model positional, as official


def test_state_dict_names():
    base = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
            "norm.weight", "out_proj.weight"}
    assert set(Mamba2(d_model=16, d_state=4, headdim=8).state_dict()) == base
    learnable = Mamba2(d_model=16, d_state=4, headdim=8, learnable_init_states=True)
    assert set(learnable.state_dict()) == base | {"init_states"}
    other = Mamba2(d_model=16, d_state=4, headdim=8, bias=True, conv_bias=False, rmsnorm=False)
    assert set(other.state_dict()) == base - {"conv1d.bias", "norm.weight"} | {"in_proj.bias",
                                                                               "out_proj.bias"}


def test_initialisation():
    torch.manual_seed(37)
    c = Mamba2Config(d_model=128, d_state=4, headdim=2, dt_min=1e-5, dt_max=0.1,
                     dt_init_floor=1e-3, A_init_range=(2, 5), conv_init=0.05)
    block = Mamba2(c)                                      # 128 heads
    dt = F.softplus(block.dt_bias.detach().double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform over [1e-5, 0.1]: about half of the draws fall under the floor and are raised
    assert (dt < 1.001e-3).sum() >= 30 and (dt > 1e-2).sum() >= 10
    A = -torch.exp(block.A_log.detach())
    assert A.min() >= -5 * (1 + 1e-6) and A.max() <= -2 * (1 - 1e-6) and A.std() > 0.3
    assert torch.equal(block.D.detach(), torch.ones(c.nheads))
    w = block.conv1d.weight.detach()
    assert w.abs().max() <= 0.05 and w.abs().max() > 0.04   # the default kaiming bound: 0.5
    for p in (block.dt_bias, block.A_log, block.D):
        assert getattr(p, "_no_weight_decay", False) is True
    assert not getattr(block.in_proj.weight, "_no_weight_decay", False)
    assert torch.equal(Mamba2(d_model=16, d_state=4, headdim=8, D_has_hdim=True).D.detach(),
                       torch.ones(32))


# =========================================================================================
# ==== 12. input validation: named errors, and failing calls leave caches untouched
# =========================================================================================

# ------------------------------------------------------- config and functional core: one table

def _config(**kw):
    return lambda: Mamba2Config(**kw)


def _cfg(**over):
    return _config(**{"d_model": 16, "headdim": 8, **over})


def _attn_cfg(**over):
    return _config(d_model=32, n_layer=2, headdim=8, attn_layer_idx=[0],
                   attn_cfg={**ATTN_CFG, **over})


def _scan(**over):
    kw = dict(x=randn(2, 6, 4, 3), dt=randn(2, 6, 4).abs() + 0.1, A=-randn(4).abs() - 0.1,
              B=randn(2, 6, 2, 5), C=randn(2, 6, 2, 5), chunk_size=4)
    kw.update(over)
    return lambda: ssd(**kw)


def _step(**over):
    kw = dict(x=randn(2, 4, 3), dt=randn(2, 4).abs() + 0.1, A=-randn(4).abs() - 0.1,
              B=randn(2, 2, 5), C=randn(2, 2, 5), state=randn(2, 4, 3, 5))
    kw.update(over)
    return lambda: ssd_step(**kw)


def _conv(**over):
    kw = dict(x=randn(2, 7, 6), weight=randn(6, 1, 4), bias=randn(6))
    kw.update(over)
    return lambda: causal_conv1d(**kw)


def _conv_step(x, weight, state):
    return lambda: causal_conv1d_step(x, weight, None, state)


def _norm(**over):
    kw = dict(x=randn(2, 5, 8), z=randn(2, 5, 8), weight=randn(8), group_size=4)
    kw.update(over)
    return lambda: rms_norm_gated(**kw)


def _combined_zxbcdt():
    return make_block(ngroups=2).in_proj(randn(2, 5, 8)).detach()


def _combined(**over):
    def call():
        block = make_block(ngroups=2)
        c = block.config
        kw = dict(zxbcdt=_combined_zxbcdt(), conv1d_weight=block.conv1d.weight,
                  conv1d_bias=block.conv1d.bias, dt_bias=block.dt_bias,
                  A=-torch.exp(block.A_log), D=block.D, chunk_size=4, headdim=c.headdim,
                  ngroups=c.ngroups, rmsnorm_weight=block.norm.weight,
                  outproj_weight=block.out_proj.weight)
        kw.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return mamba_split_conv1d_scan_combined(**kw)
    return call


BAD_CALLS = [   # (case, call, exception type, the argument the message names)
    # config: impossible combinations
    ("cfg headdim not dividing d_ssm", _config(d_model=10, headdim=3), ValueError, "headdim"),
    ("cfg ngroups not dividing nheads", _cfg(ngroups=3), ValueError, "ngroups"),
    ("cfg d_ssm > d_inner", _cfg(d_ssm=64), ValueError, "d_ssm"),
    ("cfg d_ssm 0", _cfg(d_ssm=0), ValueError, "d_ssm"),
    ("cfg d_model negative", _config(d_model=-8), ValueError, "d_model"),
    ("cfg d_state 0", _cfg(d_state=0), ValueError, "d_state"),
    ("cfg headdim negative", _cfg(headdim=-4), ValueError, "headdim"),
    ("cfg d_conv 0", _cfg(d_conv=0), ValueError, "d_conv"),
    ("cfg chunk_size 0", _cfg(chunk_size=0), ValueError, "chunk_size"),
    ("cfg ngroups 0", _cfg(ngroups=0), ValueError, "ngroups"),
    ("cfg expand 0", _cfg(expand=0), ValueError, "expand"),
    ("cfg dt_min > dt_max", _cfg(dt_min=0.2, dt_max=0.1), ValueError, "dt_min"),
    ("cfg dt_limit inverted", _cfg(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"),
    ("cfg A_init_range 0", _cfg(A_init_range=(0, 16)), ValueError, "A_init_range"),
    ("cfg d_intermediate negative", _cfg(d_intermediate=-1), ValueError, "d_intermediate"),
    ("cfg n_layer 0", _cfg(n_layer=0), ValueError, "n_layer"),
    # config: fields of the wrong type or a non-finite value (a wrong type is also a ValueError)
    ("cfg d_model float", _config(d_model=16.0), TypeError, "d_model"),
    ("cfg d_ssm float", _cfg(d_ssm=16.0), TypeError, "d_ssm"),
    ("cfg dt_min str", _cfg(dt_min="0.001"), TypeError, "dt_min"),
    ("cfg dt_min None", _cfg(dt_min=None), TypeError, "dt_min"),
    ("cfg dt_max inf", _cfg(dt_max=math.inf), ValueError, "dt_max"),
    ("cfg dt_max nan", _cfg(dt_max=math.nan), ValueError, "dt_max"),
    ("cfg dt_init_floor inf", _cfg(dt_init_floor=math.inf), ValueError, "dt_init_floor"),
    ("cfg norm_epsilon str", _cfg(norm_epsilon="1e-5"), TypeError, "norm_epsilon"),
    ("cfg norm_epsilon 0", _cfg(norm_epsilon=0.0), ValueError, "norm_epsilon"),
    ("cfg conv_init str", _cfg(conv_init="0.1"), TypeError, "conv_init"),
    ("cfg A_init_range strs", _cfg(A_init_range=("1", "16")), TypeError, "A_init_range"),
    ("cfg A_init_range inf", _cfg(A_init_range=(1, math.inf)), ValueError, "A_init_range"),
    ("cfg A_init_range 3", _cfg(A_init_range=(1, 2, 3)), TypeError, "A_init_range"),
    ("cfg dt_limit None", _cfg(dt_limit=(0.1, None)), TypeError, "dt_limit"),
    ("cfg dt_limit nan", _cfg(dt_limit=(math.nan, 1.0)), ValueError, "dt_limit"),
    ("cfg rmsnorm str", _cfg(rmsnorm="false"), TypeError, "rmsnorm"),
    ("cfg learnable str", _cfg(learnable_init_states="true"), TypeError,
     "learnable_init_states"),
    ("cfg bias int", _cfg(bias=1), TypeError, "bias"),
    ("cfg tie None", _cfg(tie_embeddings=None), TypeError, "tie_embeddings"),
    ("cfg d_intermediate bool", _cfg(d_intermediate=True), TypeError, "d_intermediate"),
    ("cfg headdim bool", _cfg(headdim=True), TypeError, "headdim"),
    ("cfg expand float", _cfg(expand=2.0), TypeError, "expand"),
    ("cfg vocab float", _cfg(vocab_size=1.5), TypeError, "vocab_size"),
    # config: attention layers of hybrid models
    ("attn num_heads 3", _attn_cfg(num_heads=3), ValueError, "num_heads"),
    ("attn num_heads None", _attn_cfg(num_heads=None), ValueError, "num_heads"),
    ("attn num_heads_kv 3", _attn_cfg(num_heads_kv=3), ValueError, "num_heads_kv"),
    ("attn rotary 3", _attn_cfg(rotary_emb_dim=3), ValueError, "rotary_emb_dim"),
    ("attn rotary 64", _attn_cfg(rotary_emb_dim=64), ValueError, "rotary_emb_dim"),
    ("attn causal str", _attn_cfg(causal="yes"), ValueError, "causal"),
    ("attn softmax_scale 0", _attn_cfg(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("attn d_conv -1", _attn_cfg(d_conv=-1), ValueError, "d_conv"),
    ("attn unknown key", _attn_cfg(window=8), ValueError, "window"),
    ("attn layer out of range", _config(d_model=32, n_layer=2, headdim=8, attn_layer_idx=[2],
                                        attn_cfg=ATTN_CFG), ValueError, "attn_layer_idx"),
    # the scan
    ("ssd dt broadcast", _scan(dt=randn(2, 6, 1).abs()), ValueError, "dt"),
    ("ssd A broadcast", _scan(A=-torch.ones(1, dtype=F64)), ValueError, "A"),
    ("ssd D broadcast", _scan(D=torch.ones(1, dtype=F64)), ValueError, "D"),
    ("ssd D wrong p", _scan(D=torch.ones(4, 2, dtype=F64)), ValueError, "D"),
    ("ssd x int", _scan(x=torch.ones(2, 6, 4, 3, dtype=torch.long)), TypeError, "x"),
    ("ssd x rank", _scan(x=randn(6, 4, 3)), ValueError, "x"),
    ("ssd B groups", _scan(B=randn(2, 6, 3, 5), C=randn(2, 6, 3, 5)), ValueError, "B"),
    ("ssd C shape", _scan(C=randn(2, 6, 2, 4)), ValueError, "C"),
    ("ssd B broadcast batch", _scan(B=randn(1, 6, 2, 5)), ValueError, "B"),
    ("ssd seq_idx float", _scan(seq_idx=torch.zeros(2, 6)), TypeError, "seq_idx"),
    ("ssd seq_idx uint8", _scan(seq_idx=torch.tensor([[0, 1, 0, 0, 0, 0]] * 2,
                                                     dtype=torch.uint8)), TypeError, "seq_idx"),
    ("ssd seq_idx decreasing", _scan(seq_idx=torch.tensor([[0, 1, 1, 0, 0, 0]] * 2)),
     ValueError, "seq_idx"),
    ("ssd seq_idx broadcast", _scan(seq_idx=torch.zeros(1, 6, dtype=torch.long)), ValueError,
     "seq_idx"),
    ("ssd initial_states", _scan(initial_states=randn(2, 4, 3, 4)), ValueError,
     "initial_states"),
    ("ssd chunk 0", _scan(chunk_size=0), ValueError, "chunk_size"),
    ("ssd chunk -1", _scan(chunk_size=-1), ValueError, "chunk_size"),
    ("ssd chunk 2.5", _scan(chunk_size=2.5), TypeError, "chunk_size"),
    ("ssd chunk None", _scan(chunk_size=None), TypeError, "chunk_size"),
    ("ssd chunk True", _scan(chunk_size=True), TypeError, "chunk_size"),
    ("ssd_step dt broadcast", _step(dt=randn(2, 1).abs()), ValueError, "dt"),
    ("ssd_step D broadcast", _step(D=torch.ones(1, dtype=F64)), ValueError, "D"),
    ("ssd_step state", _step(state=randn(2, 4, 3, 4)), ValueError, "state"),
    ("ssd_step state expanded", _step(state=randn(1, 4, 3, 5).expand(2, 4, 3, 5)), ValueError,
     "state"),
    ("ssd_step x int", _step(x=torch.ones(2, 4, 3, dtype=torch.int32)), TypeError, "x"),
    # the convolution
    ("conv state width w-1", _conv(state=randn(2, 6, 3)), ValueError, "state"),
    ("conv weight", _conv(weight=randn(6, 2, 4)), ValueError, "weight"),
    ("conv weight channels", _conv(weight=randn(5, 1, 4)), ValueError, "weight"),
    ("conv bias", _conv(bias=randn(1)), ValueError, "bias"),
    ("conv x int", _conv(x=torch.ones(2, 7, 6, dtype=torch.long)), TypeError, "x"),
    ("conv seq_idx", _conv(seq_idx=torch.zeros(2, 6, dtype=torch.long)), ValueError, "seq_idx"),
    ("conv step state", _conv_step(randn(2, 6), randn(6, 1, 4), randn(2, 6, 3)), ValueError,
     "state"),
    ("conv step x", _conv_step(randn(2, 5), randn(6, 1, 4), randn(2, 6, 4)), ValueError,
     "weight"),
    ("conv step state expanded", _conv_step(randn(2, 6), randn(6, 1, 4),
                                            randn(1, 6, 4).expand(2, 6, 4)), ValueError, "state"),
    # the norm
    ("norm z broadcast", _norm(z=randn(1, 1, 8)), ValueError, "z"),
    ("norm weight", _norm(weight=randn(1)), ValueError, "weight"),
    ("norm group_size", _norm(group_size=3), ValueError, "group_size"),
    ("norm eps 0", _norm(eps=0.0), ValueError, "eps"),
    ("norm x int", _norm(x=torch.ones(2, 5, 8, dtype=torch.long)), TypeError, "x"),
    ("RMSNormGated group_size", lambda: RMSNormGated(10, group_size=4), ValueError,
     "group_size"),
    # the official fused entry point
    ("combined ngroups", _combined(ngroups=4), ValueError, "ngroups"),
    ("combined ngroups 3", _combined(ngroups=3), ValueError, "ngroups"),
    ("combined extra columns", _combined(zxbcdt=lambda: F.pad(_combined_zxbcdt(), (0, 2))),
     ValueError, "outproj_weight"),
    ("combined odd columns", _combined(zxbcdt=lambda: F.pad(_combined_zxbcdt(), (0, 1))),
     ValueError, "zxbcdt"),
    ("combined dt_limit inverted", _combined(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"),
    ("combined chunk 0", _combined(chunk_size=0), ValueError, "chunk_size"),
    ("combined D broadcast", _combined(D=torch.ones(1, dtype=F64)), ValueError, "D"),
    ("combined A broadcast", _combined(A=-torch.ones(1, dtype=F64)), ValueError, "A"),
    ("combined no headdim", _combined(headdim=None), TypeError, "headdim"),
    ("combined activation", _combined(activation="relu"), ValueError, "activation"),
    ("combined rmsnorm_weight", _combined(rmsnorm_weight=torch.ones(3, dtype=F64)), ValueError,
     "rmsnorm_weight"),
]


@pytest.mark.parametrize("case, call, exc, name", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_gets_a_named_error(case, call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b") as info:
        call()
    if case.startswith("cfg") and exc is TypeError:   # either except clause catches it
        assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------- block inputs and caches

@pytest.fixture(scope="module")
def robust_block():
    return make_block(seed=20, dtype=torch.float32, d_model=16, d_state=4, headdim=8,
                      chunk_size=4)


def _block_inputs(block):
    c = block.config
    u = randn(2, 6, 16, seed=21, dtype=torch.float32)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 3, 3, 3]])
    h0 = randn(2, c.nheads, c.headdim, c.d_state, seed=22, dtype=torch.float32)
    return types.SimpleNamespace(u=u, ids=ids, h0=h0, cu=torch.tensor([0, 2, 6]))


# case -> (exception, the argument named, the bad keyword arguments, the same for one token (the
# recurrent step path with a cache) or None). u is (2, 6, 16) fp32, ids (2, 6), h0 (2, 2, 8, 4).
BAD_BLOCK_INPUTS = {
    "u rank 2": (ValueError, "u", lambda t: dict(u=t.u[0]), lambda t: dict(u=t.u[0, :1])),
    "u rank 4": (ValueError, "u", lambda t: dict(u=t.u[None]), None),
    "u d_model": (ValueError, "u", lambda t: dict(u=t.u[..., :15]),
                  lambda t: dict(u=t.u[:, :1, :15])),
    "u int": (TypeError, "u", lambda t: dict(u=t.u.long()), lambda t: dict(u=t.u[:, :1].long())),
    "u float64 into fp32": (TypeError, "u", lambda t: dict(u=t.u.double()),
                            lambda t: dict(u=t.u[:, :1].double())),
    "u bfloat16 into fp32": (TypeError, "u", lambda t: dict(u=t.u.bfloat16()),
                             lambda t: dict(u=t.u[:, :1].bfloat16())),
    "u list": (TypeError, "u", lambda t: dict(u=t.u.tolist()), None),
    "u no tokens": (ValueError, "u", lambda t: dict(u=t.u[:, :0]), None),
    "u batch 0": (ValueError, "u", lambda t: dict(u=t.u[:0]), None),
    "seq_idx length": (ValueError, "seq_idx", lambda t: dict(seq_idx=t.ids[:, :5]),
                       lambda t: dict(u=t.u[:, :1], seq_idx=t.ids)),
    "seq_idx broadcast batch": (ValueError, "seq_idx", lambda t: dict(seq_idx=t.ids[:1]), None),
    "seq_idx float": (TypeError, "seq_idx", lambda t: dict(seq_idx=t.ids.double()), None),
    "seq_idx bool": (TypeError, "seq_idx", lambda t: dict(seq_idx=t.ids.bool()), None),
    "seq_idx decreasing": (ValueError, "seq_idx", lambda t: dict(seq_idx=t.ids.flip(1)), None),
    "cu_seqlens end": (ValueError, "cu_seqlens",
                       lambda t: dict(u=t.u[:1], cu_seqlens=torch.tensor([0, 2, 5])), None),
    "cu_seqlens start": (ValueError, "cu_seqlens",
                         lambda t: dict(u=t.u[:1], cu_seqlens=torch.tensor([1, 2, 6])), None),
    "cu_seqlens decreasing": (ValueError, "cu_seqlens",
                              lambda t: dict(u=t.u[:1], cu_seqlens=torch.tensor([0, 4, 2, 6])),
                              None),
    "cu_seqlens 2-D": (TypeError, "cu_seqlens",
                       lambda t: dict(u=t.u[:1], cu_seqlens=t.cu[None]), None),
    "cu_seqlens float": (TypeError, "cu_seqlens",
                         lambda t: dict(u=t.u[:1], cu_seqlens=t.cu.float()), None),
    "cu_seqlens int8": (TypeError, "cu_seqlens",
                        lambda t: dict(u=t.u[:1], cu_seqlens=t.cu.to(torch.int8)), None),
    "cu_seqlens list": (TypeError, "cu_seqlens",
                        lambda t: dict(u=t.u[:1], cu_seqlens=t.cu.tolist()), None),
    "cu_seqlens with batch 2": (ValueError, "cu_seqlens", lambda t: dict(cu_seqlens=t.cu), None),
    "cu_seqlens and seq_idx": (ValueError, "cu_seqlens",
                               lambda t: dict(u=t.u[:1], seq_idx=t.ids[:1], cu_seqlens=t.cu),
                               None),
    "initial_states shape": (ValueError, "initial_states",
                             lambda t: dict(initial_states=t.h0[..., :-1]), None),
    "initial_states broadcast batch": (ValueError, "initial_states",
                                       lambda t: dict(initial_states=t.h0[:1]), None),
    "initial_states int": (TypeError, "initial_states",
                           lambda t: dict(initial_states=t.h0.long()), None),
}


@pytest.mark.parametrize("case", list(BAD_BLOCK_INPUTS))
def test_block_rejects_bad_inputs_and_leaves_cache_untouched(robust_block, case):
    """Each bad argument is refused with an error naming it; the same call with a cache attached
    (minus initial_states, which a cache replaces), chunked and, where it applies, as a single
    token (the recurrent step), is refused the same way and leaves the cache as it was."""
    exc, name, bad, bad_step = BAD_BLOCK_INPUTS[case]
    t = _block_inputs(robust_block)
    kwargs = {"u": t.u, **bad(t)}
    with pytest.raises(exc, match=rf"\b{name}\b"):
        robust_block(**kwargs)
    if name == "initial_states":
        return
    x = kwargs["u"]
    b = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] else 2
    cache = used_cache(robust_block, b, seed=23)
    snap = cache_snapshot(cache)
    for call in [kwargs] + ([{"u": t.u[:, :1], **bad_step(t)}] if bad_step else []):
        with pytest.raises(exc, match=rf"\b{name}\b"):
            robust_block(**call, cache=cache)
        assert_cache_unchanged(cache, snap)


# case -> the argument the message names
BAD_BLOCK_CACHES = {
    "allocated for batch 2, used with 3": "cache", "allocated for batch 3, used with 1": "cache",
    "wrong d_state": "cache", "wrong d_conv only": "cache", "meta device": "cache",
    "float16": "cache", "float64": "cache", "not a cache": "cache",
    "with initial_states": "initial_states",
}


@pytest.mark.parametrize("case", list(BAD_BLOCK_CACHES))
def test_block_rejects_bad_cache_and_leaves_it_untouched(robust_block, case):
    """A cache for another batch size, config, device or dtype is refused (nothing silently
    broadcast or cast) and left exactly as it was, on the chunked and the single-token path."""
    c = robust_block.config
    u = randn(3, 4, 16, seed=24, dtype=torch.float32)
    h0 = randn(3, c.nheads, c.headdim, c.d_state, seed=25, dtype=torch.float32)
    other = Mamba2Config(d_model=16, d_state=5, headdim=8)
    kwargs = {}
    if case == "allocated for batch 2, used with 3":
        cache = used_cache(robust_block, 2, seed=26)
    elif case == "allocated for batch 3, used with 1":
        cache, u, h0 = used_cache(robust_block, 3, seed=26), u[:1], h0[:1]
    elif case == "wrong d_state":
        cache = InferenceCache.alloc(3, other).reset()
        cache.ssm_state.normal_(generator=gen(1)), cache.conv_state.normal_(generator=gen(2))
    elif case == "wrong d_conv only":          # ssm_state fits, conv_state does not: neither moves
        cache = used_cache(robust_block, 3, seed=27)
        cache.conv_state = torch.randn(3, c.conv_dim, c.d_conv + 1, generator=gen(3))
    elif case == "meta device":
        cache = InferenceCache.alloc(3, c, device="meta")
    elif case in ("float16", "float64"):
        cache = used_cache(robust_block, 3, seed=28)
        dtype = getattr(torch, case)
        cache = InferenceCache(cache.conv_state.to(dtype), cache.ssm_state.to(dtype))
    elif case == "not a cache":
        good = used_cache(robust_block, 3, seed=29)
        cache = (good.conv_state, good.ssm_state)
    else:
        cache = used_cache(robust_block, 3, seed=30)
        kwargs = dict(initial_states=h0)
    snap = None if case in ("meta device", "not a cache") else cache_snapshot(cache)
    for x in (u, u[:, :1]):                                   # the chunked and the step path
        with pytest.raises((ValueError, TypeError), match=rf"\b{BAD_BLOCK_CACHES[case]}\b"):
            with torch.no_grad():
                robust_block(x, cache=cache, **kwargs)
        if snap is not None:
            assert_cache_unchanged(cache, snap)


# --------------------------------------------------------------------------------- model inputs

@pytest.fixture(scope="module")
def small_lm():
    """A float64 2-layer model of SMALL_LM (vocabulary 37, padded to 40)."""
    return lm_model(seed=3, **SMALL_LM)


BAD_MODEL_INPUTS = [
    ("ids_negative", ValueError, "input_ids"), ("ids_padded_vocab", ValueError, "input_ids"),
    ("ids_huge", ValueError, "input_ids"), ("ids_float", TypeError, "input_ids"),
    ("ids_list", TypeError, "input_ids"), ("ids_rank1", ValueError, "input_ids"),
    ("ids_empty", ValueError, "input_ids"), ("ids_batch0", ValueError, "input_ids"),
    ("seq_idx_shape", ValueError, "seq_idx"), ("seq_idx_decreasing", ValueError, "seq_idx"),
    ("cache_batch", ValueError, "cache"), ("cache_float32", TypeError, "cache"),
    ("cache_layers", TypeError, "cache"), ("cache_second_layer_bad", ValueError, "cache"),
    ("num_last_tokens_negative", ValueError, "num_last_tokens"),
    ("num_last_tokens_too_many", ValueError, "num_last_tokens"),
    ("labels_shape", ValueError, "labels"), ("labels_float", TypeError, "labels"),
    ("labels_out_of_range", ValueError, "labels"),
    ("labels_with_num_last_tokens", ValueError, "labels"),
]


@pytest.mark.parametrize("case, exc, name", BAD_MODEL_INPUTS)
def test_model_rejects_bad_inputs_and_leaves_every_layer_cache_untouched(small_lm, case, exc,
                                                                         name):
    model = small_lm
    ids = torch.randint(0, 37, (3, 5), generator=gen(32))
    cache = model.allocate_inference_cache(3)
    with torch.no_grad():
        model(torch.randint(0, 37, (3, 4), generator=gen(33)), cache=cache)
    kwargs = dict(input_ids=ids, cache=cache)
    V = model.config.padded_vocab_size
    if case == "ids_negative":
        ids[1, 2] = -1
    elif case == "ids_padded_vocab":
        ids[2, 4] = V
    elif case == "ids_huge":
        ids[0, 0] = 10 ** 6
    elif case == "ids_float":
        kwargs["input_ids"] = ids.float()
    elif case == "ids_list":
        kwargs["input_ids"] = ids.tolist()
    elif case == "ids_rank1":
        kwargs["input_ids"] = ids[0]
    elif case == "ids_empty":
        kwargs["input_ids"] = ids[:, :0]
    elif case == "ids_batch0":
        kwargs.update(input_ids=ids[:0], cache=None)
    elif case == "seq_idx_shape":
        kwargs["seq_idx"] = torch.zeros(1, 5, dtype=torch.long)      # would broadcast
    elif case == "seq_idx_decreasing":
        kwargs["seq_idx"] = torch.tensor([[0, 0, 1, 1, 0]] * 3)
    elif case == "cache_batch":
        kwargs["cache"] = cache = model.allocate_inference_cache(2)  # for 2, used with 3
    elif case == "cache_float32":
        kwargs["cache"] = cache = model.allocate_inference_cache(3, dtype=torch.float32)
    elif case == "cache_layers":
        kwargs["cache"] = cache = cache[:1]
    elif case == "cache_second_layer_bad":                           # layer 0 fine, layer 1 not
        cache[1] = InferenceCache(cache[1].conv_state, cache[1].ssm_state[:, :, :, :-1].clone())
    elif case == "num_last_tokens_negative":
        kwargs["num_last_tokens"] = -1
    elif case == "num_last_tokens_too_many":
        kwargs["num_last_tokens"] = 6                                 # 5 tokens
    elif case == "labels_shape":
        kwargs["labels"] = ids[:, 1:]
    elif case == "labels_float":
        kwargs["labels"] = ids.float()
    elif case == "labels_out_of_range":
        kwargs["labels"] = ids.clone().index_fill_(1, torch.tensor([3]), -5)   # only -100 ignores
    elif case == "labels_with_num_last_tokens":
        kwargs.update(labels=ids, num_last_tokens=1)
    snap = cache_snapshot(cache)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        with torch.no_grad():
            model(**kwargs)
    assert_cache_unchanged(cache, snap)
    if case == "ids_padded_vocab":   # the largest real token id is valid
        ids[2, 4] = model.config.vocab_size - 1
        with torch.no_grad():
            assert model(ids).shape == (3, 5, V)
    if case == "num_last_tokens_too_many":
        with torch.no_grad():
            assert model(ids, num_last_tokens=5).shape == (3, 5, V)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.float32,
                                   torch.bool])
def test_token_ids_of_a_small_or_wrong_dtype_are_named(small_lm, dtype):
    ids = torch.randint(0, 30, (2, 5), generator=gen(1))
    with pytest.raises(TypeError, match="input_ids"):
        small_lm(ids.to(dtype))
    with pytest.raises(TypeError, match="input_ids"):
        small_lm.generate(ids.to(dtype), max_new_tokens=1)
    with pytest.raises(TypeError, match="labels"):
        small_lm(ids, labels=ids.to(dtype))


def test_one_cache_shared_by_two_layers_is_refused(small_lm):
    ids = torch.randint(0, 30, (1, 4), generator=gen(3))
    cache = small_lm.allocate_inference_cache(1)
    shared = [cache[0], cache[0]]
    snap = cache_snapshot(shared)
    with pytest.raises(ValueError, match="cache"):
        small_lm(ids, cache=shared)
    assert_cache_unchanged(shared, snap)
    halves = [InferenceCache(cache[0].conv_state, cache[1].ssm_state), cache[1]]
    with pytest.raises(ValueError, match="share memory"):
        small_lm(ids, cache=halves)


@pytest.mark.parametrize("length", [1, 4], ids=["step", "prompt"])
@pytest.mark.parametrize("case", ["expanded_conv", "strided_slices", "inference_mode_with_grad",
                                  "requires_grad", "layer_k_raises"])
def test_failed_call_leaves_every_cache_as_it_was(small_lm, case, length, monkeypatch):
    model = small_lm
    b = 2
    cache = used_cache(model, b, seed=5)
    ids = torch.randint(0, 30, (b, length), generator=gen(6))
    grad, message = False, "cache"
    if case == "expanded_conv":
        cache[1] = InferenceCache(cache[1].conv_state[:1].expand(b, -1, -1), cache[1].ssm_state)
    elif case == "strided_slices":
        big = torch.zeros(b, cache[1].ssm_state.shape[1] * 2, *cache[1].ssm_state.shape[2:],
                          dtype=F64)
        big[:, ::2] = cache[1].ssm_state
        cache[1] = InferenceCache(cache[1].conv_state, big[:, ::2])
    elif case == "inference_mode_with_grad":
        with torch.inference_mode():
            made = model.allocate_inference_cache(b)
        cache[1] = made[1]
        grad = True
    elif case == "requires_grad":
        cache[1] = InferenceCache(cache[1].conv_state, cache[1].ssm_state.clone().requires_grad_())
    else:
        def boom(*a, **k):
            raise RuntimeError("layer 1 failed")
        monkeypatch.setattr(model.backbone.layers[1].mixer, "_through_cache", boom)
        message = "layer 1 failed"
    snap = cache_snapshot(cache)
    with torch.set_grad_enabled(grad):
        with pytest.raises(ValueError if message == "cache" else RuntimeError, match=message):
            model(ids, cache=cache)
    assert_cache_unchanged(cache, snap)


def test_failed_lm_head_leaves_caches_as_they_were(small_lm, monkeypatch):
    """The caches move on only when the whole call succeeds, the head included."""
    cache = used_cache(small_lm, 1, seed=7)
    snap = cache_snapshot(cache)

    def boom(*a, **k):
        raise RuntimeError("head failed")
    monkeypatch.setattr(small_lm.lm_head, "forward", boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="head failed"):
        small_lm(torch.tensor([[3]]), cache=cache)
    assert_cache_unchanged(cache, snap)


def test_classification_mask_with_two_runs_is_refused():
    clf = Mamba2ForSequenceClassification(Mamba2Config(d_model=16, n_layer=1, d_state=4,
                                                       headdim=8, vocab_size=20), dtype=F64)
    ids = torch.randint(0, 20, (2, 6), generator=gen(4))
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask"):
        clf(ids, attention_mask=mask)
    out = clf(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


# ------------------------------------------------------------------------ generation arguments

BAD_GENERATE_ARGUMENTS = [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(min_p=-0.01), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=-2.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(attention_mask=torch.ones(3, 6, dtype=torch.long)), "attention_mask"),     # length
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), "attention_mask"),     # batch
    (dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), "attention_mask"),     # broadcast
    # masks with right padding, a hole, a value not 0/1, a row without a real token
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1] * 5, [1] * 5])), "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 1, 0, 1, 1], [1] * 5, [1] * 5])), "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 0, 2, 1, 1], [1] * 5, [1] * 5])), "attention_mask"),
    (dict(attention_mask=torch.tensor([[0] * 5, [1] * 5, [1] * 5])), "attention_mask"),
    (dict(eos_token_id=-3), "eos_token_id"),
]


@pytest.mark.parametrize("kw, name", BAD_GENERATE_ARGUMENTS,
                         ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_GENERATE_ARGUMENTS)])
def test_generate_rejects_bad_arguments(small_lm, kw, name):
    ids = torch.randint(0, 37, (3, 5), generator=gen(34))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        small_lm.generate(ids, **{"max_new_tokens": 2, **kw})


@pytest.mark.parametrize("bad", [-1, 40, 1000, 10 ** 6], ids=["-1", "padded_vocab", "1000", "1e6"])
def test_generate_and_forward_reject_out_of_range_ids(small_lm, bad):
    assert small_lm.config.padded_vocab_size == 40
    ids = torch.randint(0, 37, (2, 4), generator=gen(35))
    ids[1, 2] = bad
    with pytest.raises(ValueError, match="input_ids"):
        small_lm.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        small_lm(ids)


def test_generate_takes_numpy_and_tensor_token_ids(small_lm):
    ids = torch.randint(0, 30, (2, 4), generator=gen(8))
    free = small_lm.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])
    want = small_lm.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    for e, p in [(np.int64(eos), np.int32(1)), (torch.tensor(eos), torch.tensor(1)),
                 ([np.int64(eos)], 1), (torch.tensor([eos]), 1)]:
        assert torch.equal(small_lm.generate(ids, max_new_tokens=6, eos_token_id=e,
                                             pad_token_id=p), want)
    for bad, exc in [(2.5, TypeError), ("3", TypeError), (True, TypeError), (-1, ValueError),
                     (37, ValueError), ([1, 2.0], TypeError)]:
        with pytest.raises(exc, match="eos_token_id"):
            small_lm.generate(ids, max_new_tokens=2, eos_token_id=bad)
    with pytest.raises(TypeError, match="pad_token_id"):
        small_lm.generate(ids, max_new_tokens=2, eos_token_id=3, pad_token_id=[1, 2])


def test_streamer_without_end_is_refused_before_any_work(small_lm):
    calls = []

    class HalfStreamer:
        def put(self, value):
            calls.append(value)

    with pytest.raises(TypeError, match="streamer"):
        small_lm.generate(torch.tensor([[1, 2]]), max_new_tokens=3, streamer=HalfStreamer())
    assert calls == []


# =========================================================================================
# ==== 13. checkpoints
# =========================================================================================

# ------------------------------------------------------------------------- transformers format

@pytest.mark.parametrize("g,tie", [(1, False), (1, True), (2, False), (2, True)])
def test_transformers_checkpoint_logits_and_greedy_generate(tmp_path, g, tie):
    hf = randomize(hf_lm_model(g=g, tie=tie, seed=g), seed=10 + g).double()
    hf.save_pretrained(tmp_path)
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert ours.dtype == torch.float64
    assert ours.config.ngroups == g and ours.config.tie_embeddings == tie
    assert ours.config.d_model == 64 and ours.config.nheads == 8 and ours.config.d_state == 16
    for l in (1, 7, 37):
        ids = lm_ids(2, l, seed=l)
        with torch.no_grad():
            want = hf(ids).logits.double()
            got = ours(ids)
        assert got.shape[:2] == (2, l) and got.shape[-1] >= LM_VOCAB
        # transformers runs parts of the block in fp32 even for a fp64 model: measured 2.3e-6
        assert_close(got[..., :LM_VOCAB], want, atol=3e-5, what=f"logits, l={l}")
    prompt = lm_ids(2, 5, seed=99)
    # an explicit mask: transformers would otherwise take prompt tokens equal to pad_token_id for
    # padding
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                       do_sample=False, eos_token_id=hf.config.eos_token_id,
                       pad_token_id=hf.config.pad_token_id)
    got = ours.generate(prompt, max_new_tokens=10, eos_token_id=hf.config.eos_token_id,
                        pad_token_id=hf.config.pad_token_id)
    assert torch.equal(got, want)


def test_transformers_sharded_checkpoint(tmp_path):
    hf = randomize(hf_lm_model(g=2, tie=False, seed=3), seed=4)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert index.is_file()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1
    whole = Mamba2LMHeadModel.from_pretrained(tmp_path / "one")
    sharded = Mamba2LMHeadModel.from_pretrained(tmp_path / "sharded")
    a, b = whole.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = lm_ids(2, 21, seed=5)
    with torch.no_grad():
        want = hf(ids).logits
        got = sharded(ids)
    assert torch.equal(got, whole(ids))
    assert_close(got[..., :LM_VOCAB], want, atol=4e-5, what="sharded vs transformers")  # 3.8e-6


# ---------------------------------------------------------------------------- mamba_ssm format

@pytest.mark.parametrize("tie,d_intermediate,g",
                         [(True, 0, 1), (False, 0, 2), (True, 40, 2), (False, 40, 1)])
def test_official_checkpoint_reproduces_logits(tmp_path, tie, d_intermediate, g):
    src = lm_model(dtype=torch.float32, seed=7, tie_embeddings=tie, d_intermediate=d_intermediate,
                   ngroups=g)
    assert set(src.state_dict()) == official_keys(2, d_intermediate)
    state = write_official(tmp_path, src)
    if d_intermediate:   # official GatedMLP: hidden rounded up to 128s, fc1 holds value and gate
        assert state["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 32)
        assert state["backbone.layers.0.mlp.fc2.weight"].shape == (32, 128)
    assert state["backbone.embedding.weight"].shape == (112, 32)
    assert state["backbone.layers.1.mixer.in_proj.weight"].shape == (2 * 64 + 2 * g * 8 + 8, 32)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.d_intermediate == d_intermediate and loaded.config.ngroups == g
    assert loaded.config.tie_embeddings == tie and loaded.config.padded_vocab_size == 112
    ids = lm_ids(3, 29, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))


@pytest.mark.parametrize("tie,g", [(True, 1), (False, 2)])
def test_official_checkpoint_matches_transformers_oracle(tmp_path, tie, g):
    src = lm_model(dtype=torch.float32, seed=8, tie_embeddings=tie, ngroups=g)
    state = write_official(tmp_path, src)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    # the same weights in transformers' implementation (its vocabulary is the padded one, 112)
    hf = hf_lm_model(g=g, tie=tie, vocab=112, hidden=32, heads=8, head_dim=8, state=8)
    renamed = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
               for k, v in state.items()}
    result = hf.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if not (tie and k == "lm_head.weight")]
    assert torch.equal(hf.lm_head.weight, state["lm_head.weight"])
    for l in (1, 7, 37):
        ids = lm_ids(2, l, seed=20 + l)
        with torch.no_grad():
            want = hf(ids).logits
            got = loaded(ids)
        assert_close(got, want, atol=3e-5, what=f"logits, l={l}")     # fp32: measured 2.4e-6


def test_official_format_writes_official_keys_and_refuses_the_rest(tmp_path):
    model = lm_model(seed=15, **SMALL_LM)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert set(config) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                           "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                           "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
    assert config["ssm_cfg"]["layer"] == "Mamba2"
    state = torch.load(tmp_path / "m" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in state                    # the official file holds the tied head
    for bad, field in [(dict(learnable_init_states=True), "learnable_init_states"),
                       (dict(norm_epsilon=1e-6), "norm_epsilon")]:
        with pytest.raises(ValueError, match=field):
            lm_model(**SMALL_LM, **bad).save_pretrained(tmp_path / "refused")
        assert not (tmp_path / "refused" / "config.json").exists()
    for bad, what in [(dict(norm_before_gate=True), "norm_before_gate"),
                      (dict(d_intermediate=8), "d_intermediate"),
                      (dict(D_has_hdim=True), "D_has_hdim")]:
        with pytest.raises(ValueError, match=what):
            lm_model(**SMALL_LM, **bad).save_pretrained(tmp_path / "refused",
                                                        format="transformers")


def test_official_configs_read_with_official_defaults(tmp_path):
    """A config.json without pad_vocab_size_multiple pads by 8, as MambaConfig does."""
    model = lm_model(seed=17, **SMALL_LM)                  # vocabulary 37 padded by 8: 40
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["pad_vocab_size_multiple"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path / "m")
    assert loaded.config.pad_vocab_size_multiple == 8 and loaded.config.padded_vocab_size == 40


# ----------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("d_model", [32, 16])
@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trip_and_bfloat16(tmp_path, tie, d_model):
    """save_pretrained -> from_pretrained is exact (config, every tensor and its dtype, tying,
    logits), also for a d_inner (32) that is not a multiple of the default headdim 64; loading in
    bf16 converts every tensor but D (kept in fp32 as stored, as official)."""
    src = lm_model(dtype=torch.float32, seed=11, tie_embeddings=tie, ngroups=2, d_intermediate=24,
                   dt_limit=(0.0, 2.0), d_model=d_model)
    src.save_pretrained(tmp_path)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config == src.config
    assert loaded.config.to_dict() == src.config.to_dict()
    a, b = src.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tied = loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert tied == tie
    ids = lm_ids(2, 19, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))

    bf = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    c = bf.state_dict()
    assert c.keys() == a.keys()
    for k in a:       # D stays fp32 in a bf16 model, as official: the stored fp32 value as it is
        want = torch.float32 if k.endswith(".D") else torch.bfloat16
        assert c[k].dtype == want, k
        assert torch.equal(c[k], a[k].to(want)), k
    assert (bf.lm_head.weight is bf.backbone.embedding.weight) == tie
    with torch.no_grad():
        full, low = src(ids), bf(ids)
    assert low.dtype == torch.bfloat16
    assert_rel(low, full, 0.1, "bf16 logits vs fp32")                  # measured 1.9e-2


def test_from_pretrained_loads_legacy_torch_save_format(tmp_path):
    """A pytorch_model.bin written in torch's older non-zip format (plain tensors only) is a valid
    checkpoint: it loads (safely, weights_only) and gives the same logits."""
    model = lm_model(seed=41, dtype=torch.float32, **SMALL_LM)
    model.save_pretrained(tmp_path)
    safetensors_to_bin(tmp_path, _use_new_zipfile_serialization=False)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 37, (2, 6), generator=gen(42))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_dtype_and_device_arguments(tmp_path):
    d = tmp_path / "m"
    model = lm_model(seed=18, dtype=torch.float32, **SMALL_LM)
    model.save_pretrained(d)
    half = Mamba2LMHeadModel.from_pretrained(d, dtype="float16")
    assert half.dtype == torch.float16
    assert Mamba2LMHeadModel.from_pretrained(d, dtype="torch.bfloat16").dtype == torch.bfloat16
    for bad in ("int8", "float17", 42, torch.int64):
        with pytest.raises(TypeError, match="dtype"):
            Mamba2LMHeadModel.from_pretrained(d, dtype=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            Mamba2LMHeadModel.from_pretrained(d, device="cuda")
    with pytest.raises(ValueError, match="device"):
        Mamba2LMHeadModel.from_pretrained(d, device="nonsense")


def test_integer_and_mixed_dtype_weight_files(tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    model = lm_model(seed=19, dtype=torch.float32, **SMALL_LM)
    model.save_pretrained(d, format="full")
    state = load_file(str(d / "model.safetensors"))
    mixed = {k: (v if "A_log" in k or "dt_bias" in k else v.half()) for k, v in state.items()}
    save_file(mixed, str(d / "model.safetensors"))
    loaded = Mamba2LMHeadModel.from_pretrained(d)           # the dtype most weights have
    assert {n: p.dtype for n, p in loaded.named_parameters() if p.dtype != torch.float16} == \
        {f"backbone.layers.{i}.mixer.D": torch.float32 for i in range(2)}    # D: fp32, official
    assert Mamba2LMHeadModel.from_pretrained(d, dtype=torch.float32).dtype == torch.float32
    state["backbone.layers.0.mixer.D"] = state["backbone.layers.0.mixer.D"].long()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="backbone.layers.0.mixer.D"):
        Mamba2LMHeadModel.from_pretrained(d)


# ---------------------------------------------------------------------------------- bad files

def _saved(tmp_path, name="ckpt", **kw):
    d = tmp_path / name
    lm_model(seed=16, **SMALL_LM).save_pretrained(d, format="transformers", **kw)
    return d


def test_from_pretrained_rejects_bad_checkpoints(tmp_path):
    good = tmp_path / "good"
    lm_model(seed=38, dtype=torch.float32, **SMALL_LM).save_pretrained(good)
    for missing in (tmp_path / "does_not_exist", tmp_path / "no" / "such" / "checkpoint"):
        with pytest.raises(ValueError, match="does not exist") as info:
            Mamba2LMHeadModel.from_pretrained(missing)
        assert missing.name in str(info.value)
    with pytest.raises(ValueError, match="is a file"):
        Mamba2LMHeadModel.from_pretrained(good / "config.json")
    with pytest.raises(TypeError, match="name_or_path"):
        Mamba2LMHeadModel.from_pretrained(42)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="config.json"):
        Mamba2LMHeadModel.from_pretrained(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights"):
        Mamba2LMHeadModel.from_pretrained(no_weights)


@pytest.mark.parametrize("content, key", [
    (b'{"d_model": 32,', "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"d_model": 16, "n_layer": 2, "vocab_size": 37, \xff}', "UTF-8"),
    (json.dumps({"model_type": "llama", "hidden_size": 32}).encode(),
     "unknown checkpoint format"),
    (json.dumps({"architectures": ["SomethingElse"], "width": 32}).encode(),
     "unknown checkpoint format"),
    (json.dumps({"model_type": "mamba2", "num_hidden_layers": 2}).encode(), "hidden_size"),
    (json.dumps({"model_type": "mamba2", "hidden_size": 16, "time_step_limit": None}).encode(),
     "time_step_limit"),
    (json.dumps({"model_type": "mamba2", "hidden_size": 16, "time_step_limit": [0.0, None]}
                ).encode(), "time_step_limit"),
    (json.dumps({"d_model": 16, "n_layer": 2, "ssm_cfg": ["Mamba2"]}).encode(), "ssm_cfg"),
    (json.dumps({"d_model": 16, "n_layer": 2, "ssm_cfg": {}}).encode(), "Mamba1"),
    (json.dumps({"d_model": 16, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2", "d_state": "4"}}
                ).encode(), "d_state"),
    (json.dumps({"d_model": 16, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"},
                 "surprise": 1}).encode(), "surprise"),
], ids=["not_json", "not_object", "not_utf8", "llama", "architectures", "no_hidden_size",
        "time_step_limit_none", "time_step_limit_pair", "ssm_cfg_list", "mamba1", "d_state_str",
        "unknown_key"])
def test_bad_configs_name_the_file_and_key(tmp_path, content, key):
    d = _saved(tmp_path)
    (d / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=key) as info:
        Mamba2LMHeadModel.from_pretrained(d)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_from_pretrained_tensor_mismatch_names_the_tensor(tmp_path, problem):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "ckpt"
    lm_model(dtype=torch.float32, seed=12, tie_embeddings=False).save_pretrained(d)
    state = load_file(str(d / "model.safetensors"))
    if problem == "missing":
        name = "backbone.layers.1.mixer.D"
        del state[name]
    elif problem == "unexpected":
        name = "backbone.layers.0.mixer.surplus_bias"
        state[name] = torch.zeros(3)
    else:
        name = "backbone.layers.0.mixer.A_log"
        state[name] = torch.zeros(9)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(name)):
        Mamba2LMHeadModel.from_pretrained(d)


@pytest.mark.parametrize("writer", ["save_pretrained", "safetensors_to_bin", "write_official"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_from_pretrained_truncated_weight_file(tmp_path, writer, keep):
    """A weight file cut short (half of it, or only its header's start) is an error naming it,
    whichever wrote it: save_pretrained (model.safetensors), torch.save of the same tensors, or
    the official mamba_ssm layout (pytorch_model.bin with the tied head)."""
    if writer == "write_official":
        write_official(tmp_path, lm_model(dtype=torch.float32, seed=13))
    else:
        lm_model(seed=39, dtype=torch.float32, **SMALL_LM).save_pretrained(tmp_path)
        if writer == "safetensors_to_bin":
            safetensors_to_bin(tmp_path)
    f = tmp_path / ("model.safetensors" if writer == "save_pretrained" else "pytorch_model.bin")
    Mamba2LMHeadModel.from_pretrained(tmp_path)                 # the intact file loads
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(f.name)):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


class Payload:
    """Unpickling this object creates `marker` (it stands for any attack), by a shell command
    (os.system) or by Python code (exec)."""

    def __init__(self, marker, kind):
        self.marker, self.kind = str(marker), kind

    def __reduce__(self):
        if self.kind == "system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("kind", ["system", "exec"])
@pytest.mark.parametrize("how", ["torch_save", "plain_pickle", "sharded_index", "official"])
def test_from_pretrained_never_executes_checkpoint_code(tmp_path, how, kind):
    """A pickle payload in a weight file (torch.save, plain pickle, a shard behind an index, the
    official layout) is refused by name and never runs."""
    marker = tmp_path / "PWNED"
    # the payload is live: unrestricted unpickling runs it, by pickle and by torch.load alike
    pickle.loads(pickle.dumps(Payload(tmp_path / "probe1", kind)))
    torch.save({"x": Payload(tmp_path / "probe2", kind)}, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert (tmp_path / "probe1").exists() and (tmp_path / "probe2").exists()

    d = tmp_path / "evil"
    if how == "official":
        state = write_official(d, lm_model(dtype=torch.float32, seed=14))
        victim = "backbone.layers.0.mixer.D"
    else:
        lm_model(seed=40, dtype=torch.float32, **SMALL_LM).save_pretrained(d)
        state = safetensors_to_bin(d)
        victim = "backbone.norm_f.weight"
    evil = {**state, victim: Payload(marker, kind)}
    if how in ("torch_save", "official"):
        torch.save(evil, d / "pytorch_model.bin")
    elif how == "plain_pickle":
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(evil))
    else:
        shard = "pytorch_model-00001-of-00001.bin"
        torch.save(evil, d / shard)
        (d / "pytorch_model.bin.index.json").write_text(
            '{"metadata": {}, "weight_map": {' + ", ".join(f'"{k}": "{shard}"' for k in state)
            + "}}")
    with pytest.raises(ValueError, match=r"(?i)refus"):
        Mamba2LMHeadModel.from_pretrained(d)
    assert not marker.exists(), "loading a checkpoint executed code from it"


# ------------------------------------------------------------------------ atomic saves, confinement

@pytest.mark.parametrize("fmt", ["mamba_ssm", "full", "transformers"])
@pytest.mark.parametrize("failing", ["safetensors", "torch_save", "rename"])
def test_save_failure_midway_keeps_the_old_checkpoint(tmp_path, monkeypatch, fmt, failing):
    if failing == "torch_save" and fmt != "mamba_ssm":
        pytest.skip("only the mamba_ssm format writes pytorch_model.bin")
    old = lm_model(seed=10, tie_embeddings=False, **SMALL_LM)
    new = lm_model(seed=11, tie_embeddings=False, **SMALL_LM)
    d = tmp_path / "ckpt"
    ids, want = save_and_logits(old, d, format=fmt)
    mine = {"model_backup.safetensors": b"mine", "model-v1.safetensors": b"mine too",
            "notes.txt": b"hello"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    before = sorted(p.name for p in d.iterdir())

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if failing == "safetensors":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    elif failing == "torch_save":
        monkeypatch.setattr(torch, "save", disk_full)
    else:
        real = os.replace
        calls = []

        def replace_then_fail(a, b):
            calls.append(b)
            if len(calls) == 1:
                raise OSError(errno.EIO, "I/O error")
            return real(a, b)
        monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="No space left|I/O error"):
        new.save_pretrained(d, format=fmt)
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir()) == before, "temporary files left behind"
    for name, data in mine.items():
        assert (d / name).read_bytes() == data
    loaded = Mamba2LMHeadModel.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)


@pytest.mark.parametrize("fmt", ["mamba_ssm", "full", "transformers"])
def test_save_replaces_only_checkpoint_files(tmp_path, fmt):
    d = tmp_path / "ckpt"
    lm_model(seed=12, **SMALL_LM).save_pretrained(d, format="transformers", max_shard_size=2000)
    shards = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1                                  # sharded first
    mine = {"model_backup.safetensors": b"a", "model-v1.safetensors": b"b",
            "pytorch_model_old.bin": b"c", "tokenizer.json": b"{}"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    model = lm_model(seed=13, **SMALL_LM)
    ids, want = save_and_logits(model, d, format=fmt)
    for name, data in mine.items():
        assert (d / name).read_bytes() == data, name
    left = {p.name for p in d.iterdir()} - set(mine)
    expected = {"mamba_ssm": {"config.json", "pytorch_model.bin", "model.safetensors"},
                "full": {"config.json", "model.safetensors"},
                "transformers": {"config.json", "model.safetensors"}}[fmt]
    assert left == expected, left
    with torch.no_grad():
        assert torch.equal(Mamba2LMHeadModel.from_pretrained(d)(ids), want)


def test_save_hand_tied_head_meta_model_and_home(tmp_path, monkeypatch):
    model = lm_model(seed=14, tie_embeddings=False, **SMALL_LM)
    model.lm_head.weight = model.backbone.embedding.weight          # tied by hand, not by config
    ids, want = save_and_logits(model, tmp_path / "tied", format="full")
    with torch.no_grad():
        assert torch.equal(Mamba2LMHeadModel.from_pretrained(tmp_path / "tied")(ids), want)
    with torch.device("meta"):
        ghost = Mamba2LMHeadModel(model.config)
    before = sorted((tmp_path / "tied").iterdir())
    with pytest.raises(ValueError, match="meta"):
        ghost.save_pretrained(tmp_path / "tied")
    assert sorted((tmp_path / "tied").iterdir()) == before
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model.save_pretrained("~/saved", format="full")
    assert (tmp_path / "home" / "saved" / "config.json").is_file()
    assert not Path("~").exists()
    with torch.no_grad():
        assert torch.equal(Mamba2LMHeadModel.from_pretrained("~/saved")(ids), want)


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink_out", "twice"])
def test_weight_files_outside_the_checkpoint_are_refused(tmp_path, how):
    d = _saved(tmp_path, max_shard_size=2000)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / shard).write_bytes((d / shard).read_bytes())
    first_key = next(k for k, v in index["weight_map"].items() if v == shard)
    if how == "parent":
        index["weight_map"][first_key] = f"../elsewhere/{shard}"
    elif how == "absolute":
        index["weight_map"][first_key] = str(elsewhere / shard)
    elif how == "symlink_out":
        (d / shard).unlink()
        (d / shard).symlink_to(elsewhere / shard)
    else:                                            # a tensor present in two shards
        second = sorted(set(index["weight_map"].values()))[1]
        from safetensors.torch import load_file, save_file
        part = load_file(str(d / second))
        part[first_key] = torch.zeros(3)
        save_file(part, str(d / second))
    index_file.write_text(json.dumps(index))
    message = {"parent": "outside the checkpoint", "absolute": "only relative",
               "symlink_out": "outside the checkpoint", "twice": "stored twice"}[how]
    with pytest.raises(ValueError, match=message):
        Mamba2LMHeadModel.from_pretrained(d)


def test_hub_snapshot_blobs_are_inside_the_checkpoint(tmp_path):
    """A hub cache snapshot links its files to ../../blobs: that stays allowed."""
    src = _saved(tmp_path)
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    loaded = Mamba2LMHeadModel.from_pretrained(snap)
    ids = torch.randint(0, 30, (2, 5), generator=gen(9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), Mamba2LMHeadModel.from_pretrained(src)(ids))


# =========================================================================================
# ==== 14. the language model: forward, the fused loss, cache, packing
# =========================================================================================

@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_logits", [1 << 25, 64], ids=["one_chunk", "one_token_chunks"])
def test_labels_loss_equals_cross_entropy_of_logits(tie, chunk_logits, monkeypatch):
    """forward(labels=) (the fused loss that never holds the logits) == F.cross_entropy on the
    returned logits, shifted by one, with -100 ignored: the value and every parameter's gradient,
    float64."""
    monkeypatch.setattr(mamba2, "LOSS_CHUNK_LOGITS", chunk_logits)
    torch.manual_seed(60)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=16, d_state=4, headdim=8, n_layer=2,
                                           vocab_size=37, chunk_size=4, tie_embeddings=tie),
                              dtype=F64)
    ids = torch.randint(0, 37, (2, 11), generator=gen(61))
    labels = ids.clone()
    labels[0, 3], labels[1, :4] = -100, -100
    params = [p for p in model.parameters()]
    loss = model(ids, labels=labels)
    got = torch.autograd.grad(loss, params)
    logits = model(ids)[..., :37]                                # the real vocabulary (of 48)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want = torch.autograd.grad(ref, params)
    assert_rel(loss, ref, 2e-15, "loss")                                   # measured 1.2e-16
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert_rel(a, b, 3e-14, f"d loss / d {name}")                       # measured 2.8e-15
    with torch.no_grad():
        assert_rel(model(ids, labels=labels), ref, 2e-15, "loss without gradients")


def test_labels_loss_bfloat16_close_to_float32():
    torch.manual_seed(62)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=32, d_state=8, headdim=8, n_layer=2,
                                           vocab_size=50))
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 33), generator=gen(63))
    loss32 = model(ids, labels=ids)
    loss32.backward()
    grad32 = model.lm_head.weight.grad
    loss16 = model16(ids, labels=ids)
    loss16.backward()
    assert loss16.dtype == torch.float32                     # the loss is taken in fp32, as HF
    assert_rel(loss16, loss32, 2e-4, "bf16 loss")                          # measured 1.7e-5
    assert_norm_rel(model16.lm_head.weight.grad, grad32, 5e-2, "bf16 lm_head gradient")  # 1.1e-2
    auto = copy.deepcopy(model)
    auto.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # fp32 weights, bf16 products
        loss_auto = auto(ids, labels=ids)
    loss_auto.backward()
    assert loss_auto.dtype == torch.float32 and auto.lm_head.weight.grad.dtype == torch.float32
    assert_rel(loss_auto, loss32, 2e-4, "autocast loss")                   # measured 1.2e-5
    assert_norm_rel(auto.lm_head.weight.grad, grad32, 5e-2, "autocast gradient")   # 1.0e-2


def test_num_last_tokens_equals_full_forward():
    model = lm_model(ngroups=2)
    ids = lm_ids(2, 23, seed=3)
    with torch.no_grad():
        full = model(ids)
        assert torch.equal(model(ids, num_last_tokens=0), full)
        for k in (1, 5, 23):
            last = model(ids, num_last_tokens=k)
            assert last.shape == (2, k, 112)
            assert_close(last, full[:, -k:], atol=2e-14, what=f"num_last_tokens={k}")  # 1.6e-15


@pytest.mark.parametrize("kw", [dict(ngroups=2), dict(d_intermediate=24, tie_embeddings=False)])
def test_cache_in_pieces_equals_full_forward(kw):
    model = lm_model(**kw)
    l = CPU_SPAN + 14   # longer than one CPU span, not a multiple of the chunk length
    ids = lm_ids(2, l, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2)
        assert len(cache) == 2
        pieces = []
        for start, end in [(0, 1), (1, 6), (6, l - 7)]:
            pieces.append(model(ids[:, start:end], cache=cache))
        for t in range(l - 7, l):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
        got = torch.cat(pieces, dim=1)
    assert got.shape == full.shape
    assert_close(got, full, atol=6e-14, what="pieces through the cache")   # measured 5.3e-15


def test_seq_idx_packing_equals_separate_runs():
    model = lm_model(ngroups=2, d_intermediate=24)
    lengths = [5, 19, 1, 12]            # segments cross chunk boundaries (chunks of 16)
    seqs = [lm_ids(1, n, seed=30 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, dim=1)
    seq_idx = packed_rows(lengths).int()
    with torch.no_grad():
        got = model(packed, seq_idx=seq_idx)
        want = torch.cat([model(s) for s in seqs], dim=1)
        assert_close(got, want, atol=3e-14, what="packed row")             # measured 2.7e-15
        # two rows packed differently in one batch
        other = torch.cat([seqs[3], seqs[1], seqs[0], seqs[2]], dim=1)
        idx2 = packed_rows([12, 19, 5, 1]).int()
        got2 = model(torch.cat([packed, other]), seq_idx=torch.cat([seq_idx, idx2]))
        want2 = torch.cat([model(s) for s in (seqs[3], seqs[1], seqs[0], seqs[2])], dim=1)
    assert_close(got2[0], want[0], atol=3e-14, what="row 0 of two")       # measured 2.7e-15
    assert_close(got2[1], want2[0], atol=2e-14, what="row 1 of two")      # measured 1.8e-15


@pytest.mark.parametrize("b", [1, 8, 32])
def test_decode_step_equals_forward_bit_for_bit_and_the_chunked_forward(b):
    """The lean step generate uses (no checks) == the checked forward through a cache, bit for
    bit; and token-by-token == the whole sequence, for batch 1, 8 and 32."""
    model = lm_model(seed=50, ngroups=2, d_intermediate=24, **SMALL_LM)
    ids = torch.randint(0, 30, (b, 9), generator=gen(b))
    with torch.no_grad():
        full = model(ids)
        lean, checked = model.allocate_inference_cache(b), model.allocate_inference_cache(b)
        model(ids[:, :4], cache=lean)
        model(ids[:, :4], cache=checked)
        for t in range(4, 9):
            a = model._decode(ids[:, t], lean)
            c = model(ids[:, t:t + 1], cache=checked)[:, 0]
            assert torch.equal(a, c)
            assert_close(a, full[:, t], atol=2e-14, what=f"step {t} vs the whole")  # 1.8e-15
    assert all(torch.equal(x.ssm_state, y.ssm_state) for x, y in zip(lean, checked))


# =========================================================================================
# ==== 15. generation
# =========================================================================================

@pytest.fixture(scope="module")
def lm():
    """The language model of the generation tests (float64, 2 groups, vocabulary 100)."""
    return lm_model(seed=21, ngroups=2)


@pytest.fixture(scope="module")
def lm_learned():
    """The same with learned initial states (every sequence, padded or not, starts from them)."""
    return lm_model(seed=23, ngroups=2, learnable_init_states=True)


@pytest.mark.parametrize("model_name", ["lm", "lm_learned"])
@pytest.mark.parametrize("penalty", [1.0, 1.7])
def test_left_padded_batch_equals_each_prompt_alone(request, model_name, penalty):
    model = request.getfixturevalue(model_name)
    prompts = [lm_ids(1, n, seed=40 + n) for n in (3, 7, 1)]
    alone = [model.generate(p, max_new_tokens=6, repetition_penalty=penalty) for p in prompts]
    # pad with a real token id, the one the shortest prompt continues with: padding must be
    # ignored, also by the repetition penalty (were the pads counted as seen, that token would be
    # penalised in the last row)
    pad_value = int(alone[2][0, 1])
    ids, mask = left_pad(prompts, pad_value=pad_value)
    out = model.generate(ids, max_new_tokens=6, attention_mask=mask, repetition_penalty=penalty)
    assert out.shape == (3, ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, ids.shape[1]:], alone[i][0, p.shape[1]:]), i


def test_max_new_tokens_zero_returns_prompt(lm):
    ids = lm_ids(2, 4, seed=1)
    assert torch.equal(lm.generate(ids, max_new_tokens=0), ids)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0),
                                dict(temperature=0.0), dict(temperature=0.0, top_k=50, top_p=0.9),
                                dict(temperature=1e-7)])
def test_degenerate_sampling_equals_greedy(lm, kw):
    ids = lm_ids(2, 6, seed=50)
    greedy = lm.generate(ids, max_new_tokens=10)
    # precondition for the tiny-temperature case: the top-2 logits along the greedy path are apart
    with torch.no_grad():
        logits = lm(greedy[:, :-1])[:, ids.shape[1] - 1:, :LM_VOCAB].float()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    for seed in (0, 1):
        sampled = lm.generate(ids, max_new_tokens=10, do_sample=True, generator=gen(seed), **kw)
        assert torch.equal(sampled, greedy), (kw, seed)


def test_greedy_with_repetition_penalty_matches_reference(lm):
    """Teacher-forced oracle: each greedy token is the argmax of the CTRL-penalised full-forward
    logits."""
    penalty = 2.5
    ids = lm_ids(2, 8, seed=60)
    out = lm.generate(ids, max_new_tokens=12, repetition_penalty=penalty)
    plain = lm.generate(ids, max_new_tokens=12)
    with torch.no_grad():
        logits = lm(out[:, :-1])[..., :LM_VOCAB].float()
    l = ids.shape[1]
    for t in range(12):
        step = logits[:, l - 1 + t].clone()
        for row in range(2):
            seen = out[row, :l + t].unique()
            v = step[row, seen]
            step[row, seen] = torch.where(v < 0, v * penalty, v / penalty)
        assert torch.equal(step.argmax(-1), out[:, l + t]), t
    assert not torch.equal(out, plain)   # the penalty changed something on this prompt


def test_repetition_penalty_lowers_seen_probabilities():
    g = gen(3)
    logits = torch.randn(4, LM_VOCAB, generator=g) * 2
    seen = torch.rand(4, LM_VOCAB, generator=g) < 0.2
    before = logits.softmax(-1)
    processed = mamba2.process_logits(logits, seen, repetition_penalty=1.5)
    after = processed.softmax(-1)
    assert (processed[seen] < logits[seen]).all()           # every seen logit moves down
    assert torch.equal(processed[~seen], logits[~seen])
    assert (after[~seen] > before[~seen]).all()
    assert ((after * seen).sum(-1) < (before * seen).sum(-1)).all()
    # a single repeated token, of positive or of negative logit: its own probability drops
    for pick in (logits.argmax(-1), logits.argmin(-1)):
        one = torch.zeros_like(seen)
        one[torch.arange(4), pick] = True
        single = mamba2.process_logits(logits, one, repetition_penalty=1.5).softmax(-1)
        assert (single[one] < before[one]).all()
    # a penalty below 1 favours what was seen
    favoured = mamba2.process_logits(logits, seen, repetition_penalty=0.5).softmax(-1)
    assert (favoured[~seen] < before[~seen]).all()
    assert ((favoured * seen).sum(-1) > (before * seen).sum(-1)).all()


def test_seeded_sampling_reproducible_and_seed_dependent(lm):
    ids = lm_ids(2, 5, seed=70)

    def sample(seed):
        return lm.generate(ids, max_new_tokens=15, do_sample=True, temperature=1.3,
                           generator=gen(seed))
    a, b = sample(123), sample(123)
    assert torch.equal(a, b)
    others = [sample(s) for s in (1, 2)]
    assert all(not torch.equal(a, o) for o in others)


def test_top_k_sampling_distribution(lm):
    n = 2000
    prompt = lm_ids(1, 6, seed=80)
    with torch.no_grad():
        first = lm(prompt)[0, -1, :LM_VOCAB].float()
    top = first.topk(2)
    p_best = top.values.softmax(-1)[0].item()
    assert 0.05 < p_best < 0.95     # both tokens have a real chance on this prompt
    out = lm.generate(prompt.expand(n, -1), max_new_tokens=1, do_sample=True, top_k=2,
                      generator=gen(0))
    tokens = out[:, -1]
    assert set(tokens.tolist()) <= set(top.indices.tolist())
    freq = (tokens == top.indices[0]).double().mean().item()
    assert abs(freq - p_best) < 5 * math.sqrt(p_best * (1 - p_best) / n)


def test_sampling_distribution_matches_transformers_warpers(lm):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    n = 3000
    prompt = lm_ids(1, 6, seed=81)
    with torch.no_grad():
        first = lm(prompt)[:, -1, :LM_VOCAB].float()
    scores = TopPLogitsWarper(0.9)(prompt, TemperatureLogitsWarper(0.8)(prompt, first.clone()))
    expected = scores.softmax(-1)[0]
    out = lm.generate(prompt.expand(n, -1), max_new_tokens=1, do_sample=True, temperature=0.8,
                      top_p=0.9, generator=gen(1))
    counts = torch.bincount(out[:, -1], minlength=LM_VOCAB).double() / n
    assert (counts[expected == 0] == 0).all()
    assert 0.5 * (counts - expected.double()).abs().sum() < 0.06


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, top_k=7),
    dict(do_sample=True, top_p=0.8),
    dict(do_sample=True, min_p=0.1),
    dict(do_sample=True, repetition_penalty=1.2, temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
])
def test_process_logits_matches_transformers_processors(kw):
    from transformers.generation.logits_process import (MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = gen(5)
    logits = torch.randn(4, LM_VOCAB, generator=g) * 3
    ids = torch.randint(0, LM_VOCAB, (4, 12), generator=g)
    seen = torch.zeros(4, LM_VOCAB, dtype=torch.bool)
    seen[torch.arange(4)[:, None], ids] = True
    chain = []
    if kw.get("repetition_penalty", 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("do_sample"):
        if kw.get("temperature", 1.0) != 1.0:
            chain.append(TemperatureLogitsWarper(kw["temperature"]))
        if kw.get("top_k", 0):
            chain.append(TopKLogitsWarper(kw["top_k"]))
        if kw.get("top_p", 1.0) < 1.0:
            chain.append(TopPLogitsWarper(kw["top_p"]))
        if kw.get("min_p", 0.0):
            chain.append(MinPLogitsWarper(kw["min_p"]))
    want = logits.clone()
    for proc in chain:
        want = proc(ids, want)
    got = mamba2.process_logits(logits.clone(), seen, **kw)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.isfinite(got).sum(-1).min() >= 1
    fin = torch.isfinite(want)
    # measured: equal; the bound is a few fp32 ulps of logits of order 10
    assert_close(got[fin], want[fin], rtol=1e-6, atol=1e-6, what="processed logits")


@pytest.mark.parametrize("eos_kind", ["int", "list"])
def test_eos_stops_rows_pads_and_stops_early(lm, eos_kind):
    ids = lm_ids(3, 5, seed=90)
    free = lm.generate(ids, max_new_tokens=14)[:, 5:]          # no eos: the reference paths
    if eos_kind == "int":
        eos = int(free[0, 3])       # row 0 finishes at step 3 at the latest; others maybe never
        eos_set, pad = {eos}, 99
        kwargs = dict(eos_token_id=eos, pad_token_id=pad)
    else:
        eos = [int(free[0, 2]), int(free[1, 4]), int(free[2, 1])]   # every row ends by step 4
        eos_set, pad = set(eos), eos[0]                               # default pad: first eos
        kwargs = dict(eos_token_id=eos)
    calls = []
    hook = lm.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = lm.generate(ids, max_new_tokens=14, **kwargs)
    finally:
        hook.remove()
    rows = [first_eos_rule(free[i].tolist(), eos_set, pad) for i in range(3)]
    if all(done for _, done in rows):
        steps = max(r.index(next(t for t in r if t in eos_set)) + 1 for r, _ in rows)
    else:
        steps = 14
    if eos_kind == "list":
        assert steps <= 5      # stopped early
    assert out.shape == (3, 5 + steps)
    assert len(calls) == steps  # no forward pass after the last needed token
    for i, (ref, _) in enumerate(rows):
        assert out[i, 5:].tolist() == ref[:steps], i


def test_streamer_receives_prompt_then_each_token(lm):
    class Recorder:
        def __init__(self):
            self.events = []

        def put(self, value):
            self.events.append(("put", value.clone()))

        def end(self):
            self.events.append(("end", None))

    ids = lm_ids(2, 4, seed=95)
    rec = Recorder()
    out = lm.generate(ids, max_new_tokens=7, do_sample=True, top_k=10, generator=gen(0),
                      streamer=rec)
    kinds = [k for k, _ in rec.events]
    assert kinds == ["put"] * 8 + ["end"]
    assert torch.equal(rec.events[0][1], ids)
    steps = [v for _, v in rec.events[1:-1]]
    assert all(v.shape == (2,) for v in steps)
    assert torch.equal(torch.cat([ids] + [v[:, None] for v in steps], dim=1), out)
    # and when all rows stop early at an eos
    rec2 = Recorder()
    free = lm.generate(ids, max_new_tokens=7)
    eos = [int(free[0, 5]), int(free[1, 5])]
    out2 = lm.generate(ids, max_new_tokens=7, eos_token_id=eos, pad_token_id=0, streamer=rec2)
    assert [k for k, _ in rec2.events].count("end") == 1 and rec2.events[-1][0] == "end"
    assert torch.equal(torch.cat([rec2.events[0][1]] + [v[:, None] for _, v in rec2.events[1:-1]],
                                 dim=1), out2)


def _forbidden(name):
    def method(*a, **k):
        raise AssertionError(f"Tensor.{name} called inside the decoding loop (a host sync)")
    return method


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=4, top_p=0.9, temperature=0.8,
                                             repetition_penalty=1.3)], ids=["greedy", "sampled"])
def test_decoding_loop_never_synchronises_with_the_host(monkeypatch, kw):
    """After the prompt's call, Tensor.item / tolist / __bool__ raise: generation (no eos, no
    streamer) still runs to the end, so no step waits for the device."""
    model = lm_model(seed=56, **SMALL_LM)
    ids = torch.randint(0, 30, (2, 5), generator=gen(57))
    want = model.generate(ids, max_new_tokens=6, generator=gen(1), **kw)
    real_forward = type(model).forward

    def forward_then_forbid(self, *a, **k):
        out = real_forward(self, *a, **k)
        for name in ("item", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, _forbidden(name))
        return out
    monkeypatch.setattr(type(model), "forward", forward_then_forbid)
    got = model.generate(ids, max_new_tokens=6, generator=gen(1), **kw)
    monkeypatch.undo()
    assert torch.equal(got, want)


def test_static_buffer_step_equals_the_eager_step():
    """The CUDA-graph step's static buffers (ids in, logits out, caches updated in place), run on
    a CPU, give the eager step's logits and caches token after token; cuda_graph=True is refused
    off CUDA and for hybrid models."""
    model = lm_model(seed=51, **SMALL_LM)
    ids = torch.randint(0, 30, (3, 5), generator=gen(52))
    with torch.inference_mode():
        static_cache = model.allocate_inference_cache(3)
        eager_cache = model.allocate_inference_cache(3)
        model(ids, cache=static_cache)
        model(ids, cache=eager_cache)
        step = mamba2._StaticDecode(model, static_cache, 3, model._decode)
        tokens = ids[:, -1]
        for _ in range(6):
            got, want = step(tokens), model._decode(tokens, eager_cache)
            assert torch.equal(got, want)
            assert all(torch.equal(a.ssm_state, b.ssm_state) and
                       torch.equal(a.conv_state, b.conv_state)
                       for a, b in zip(static_cache, eager_cache))
            tokens = want[:, :37].argmax(-1)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)
    hybrid = hybrid_model(seed=53)
    for flag in ("cuda_graph", "compile"):
        with pytest.raises(ValueError, match=flag + r"=True decodes pure Mamba-2 models.*\[1\]"):
            hybrid.generate(ids[:1], max_new_tokens=2, **{flag: True})
        with pytest.raises(TypeError, match=flag + " must be a bool, got 'yes'"):
            model.generate(ids, max_new_tokens=2, **{flag: "yes"})


def test_compiled_generate_gives_the_eager_tokens_and_caches():
    """generate(compile=True): the step compiled by torch.compile (fused kernels) gives the
    eager step's logits and cache states to float64 rounding, hence the same tokens — greedy,
    sampled, with eos; the step is one graph (no breaks, so no host syncs); a second call of the
    same batch size reuses the compilation."""
    model = lm_model(seed=54, ngroups=2, **SMALL_LM)
    ids = torch.randint(0, 37, (3, 5), generator=gen(55))
    with torch.inference_mode():
        compiled = mamba2._compiled_decode(model)
        got_cache, want_cache = model.allocate_inference_cache(3), model.allocate_inference_cache(3)
        model(ids, cache=got_cache)
        model(ids, cache=want_cache)
        tokens = ids[:, -1]
        for _ in range(4):
            got, want = compiled(tokens, got_cache), model._decode(tokens, want_cache)
            assert_close(got, want, atol=1e-12, what="compiled step's logits")
            for a, b in zip(got_cache, want_cache):
                assert_close(a.ssm_state, b.ssm_state, atol=1e-12, what="compiled step's state")
                assert_close(a.conv_state, b.conv_state, atol=1e-12, what="compiled conv")
            tokens = want[:, :37].argmax(-1)
        traced = torch._dynamo.explain(model._decode)(tokens, want_cache)
    assert (traced.graph_count, traced.graph_break_count) == (1, 0), traced.break_reasons
    counters = torch._dynamo.utils.counters
    for kw in ({}, dict(do_sample=True, top_k=5, generator=gen(56)), dict(eos_token_id=[3, 7])):
        want = model.generate(ids, max_new_tokens=6, **kw)
        if "generator" in kw:
            kw["generator"] = gen(56)
        before = dict(counters["stats"])
        assert torch.equal(model.generate(ids, max_new_tokens=6, compile=True, **kw), want), kw
    assert before.get("unique_graphs", 0) >= 1                     # compiled before that call
    assert dict(counters["stats"])["unique_graphs"] == before["unique_graphs"]  # and not again


def test_compiled_generate_past_the_recompile_limit_runs_eagerly_with_the_same_tokens():
    """Past torch's recompile_limit (set to 1 here; 8 by default) a new batch size is not
    compiled: the step runs eagerly and gives the same tokens, as README says."""
    model = lm_model(seed=58, **SMALL_LM)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for b in (2, 3):
            ids = torch.randint(0, 37, (b, 4), generator=gen(59 + b))
            before = counters["stats"]["unique_graphs"]
            got = model.generate(ids, max_new_tokens=4, compile=True)
            assert counters["stats"]["unique_graphs"] - before == (1 if b == 2 else 0), b
            assert torch.equal(got, model.generate(ids, max_new_tokens=4)), b
    torch._dynamo.reset()


def test_compile_that_cannot_build_is_a_named_error(monkeypatch):
    """Where torch.compile cannot build the step (no C++ compiler, say), generate(compile=True)
    says so and what to do, rather than surfacing the compiler's traceback alone."""
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(broken_compile, OSError("no cc"), None)
        return run
    model = lm_model(seed=57, **SMALL_LM)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match=r"torch.compile could not build the step on cpu .*"
                                           r"generate without compile"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, compile=True)


# =========================================================================================
# ==== 16. hybrid models: attention layers
# =========================================================================================

@pytest.mark.parametrize("attn", [
    dict(), dict(rotary_emb_interleaved=True), dict(num_heads_kv=1, d_conv=0, mlp_dim=0),
    dict(num_heads_kv=4, rotary_emb_dim=8, softmax_scale=0.3, qkv_proj_bias=False,
         out_proj_bias=False), dict(causal=False, rotary_emb_dim=0)],
    ids=["halves", "interleaved", "mqa,no_conv,no_mlp", "mha,full_rotary,scale", "bidirectional"])
def test_attention_layer_equals_its_definition(attn):
    model = hybrid_model(seed=30, attn=attn)
    mha = model.backbone.layers[1].mixer
    assert isinstance(mha, mamba2.MHA)
    x = randn(2, 9, 32, seed=31)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        for s in (None, seq_idx):
            assert_close(mha(x, seq_idx=s), mha_reference(mha, x, s), atol=3e-15,   # 2.2e-16
                         what=f"seq_idx={s is not None}")


def test_rotary_matches_its_definition_at_large_positions():
    x = randn(2, 5, 3, 8, seed=32)
    pos = torch.tensor([[0, 1, 2, 1000, 65535], [7, 0, 3, 4, 5]])
    for interleaved in (False, True):       # measured 9.7e-13: angles of positions up to 65535
        assert_close(mamba2.rotary(x, pos, 6, 10000.0, interleaved),
                     rotary_reference(x, pos, 6, 10000.0, interleaved), atol=1e-12,
                     what=f"interleaved={interleaved}")


@pytest.mark.parametrize("sizes", [[13], [1] * 13, [5, 1, 7], [3, 3, 3, 4]],
                         ids=["whole", "steps", "mixed", "pieces"])
def test_hybrid_whole_steps_and_pieces_agree(sizes):
    model = hybrid_model(seed=33)
    ids = torch.randint(0, 50, (2, 13), generator=gen(34))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2, max_seqlen=4)        # it has to grow
        outs, s = [], 0
        for k in sizes:
            outs.append(model(ids[:, s:s + k], cache=cache))
            s += k
    assert_close(torch.cat(outs, 1), full, atol=4e-14, what=f"pieces {sizes}")   # 3.1e-15
    assert cache[1].length == 13 and isinstance(cache[1], mamba2.AttentionCache)


def test_hybrid_packed_equals_separate_and_padded_generate_equals_alone():
    model = hybrid_model(seed=35, learnable_init_states=True)
    ids = torch.randint(0, 50, (2, 14), generator=gen(36))
    seq_idx = torch.tensor([[0] * 5 + [1] * 9, [0] * 2 + [3] * 12])
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)
        for r, cut in ((0, 5), (1, 2)):
            for s, e in ((0, cut), (cut, 14)):
                assert_close(packed[r:r + 1, s:e], model(ids[r:r + 1, s:e]), atol=3e-14,  # 2.9e-15
                             what=f"row {r} segment {s}:{e}")
    prompts = [torch.randint(0, 50, (1, n), generator=gen(n)) for n in (3, 7, 1)]
    alone = [model.generate(p, max_new_tokens=6) for p in prompts]
    padded, mask = left_pad(prompts, pad_value=0)
    out = model.generate(padded, attention_mask=mask, max_new_tokens=6)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 7:], alone[i][0, p.shape[1]:]), i


def test_hybrid_training_paths_and_non_finite_keys():
    """The fused loss and the memory-efficient path work through attention layers (gradients
    equal the plain path's); a NaN planted at a later token or in another segment reaches no
    earlier or other output."""
    plain = hybrid_model(seed=39, use_mem_eff_path=False)
    eff = hybrid_model(seed=39, use_mem_eff_path=True)
    ids = torch.randint(0, 50, (2, 10), generator=gen(40))
    grads = []
    for m in (plain, eff):
        m.train()
        m.zero_grad()
        m(ids, labels=ids).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert_close(grads[0][n], grads[1][n], atol=1e-15, what=n)          # measured: equal
    mha = plain.backbone.layers[1].mixer
    x = randn(2, 10, 32, seed=41)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():
        clean = mha(x, seq_idx=seq_idx)
        dirty = mha(plant(x, 0, 2, 5, math.nan), seq_idx=seq_idx)
        assert torch.equal(dirty[0, :2], clean[0, :2]) and torch.equal(dirty[0, 4:], clean[0, 4:])
        assert torch.equal(dirty[1], clean[1]) and not torch.isfinite(dirty[0, 2:4]).any()
        cache = mha.allocate_inference_cache(2)          # the NaN in segment 0 of the prompt
        mha(plant(x, 0, 2, 5, math.nan)[:, :6], seq_idx=seq_idx[:, :6], cache=cache)
        step = mha(x[:, 6:7], cache=cache)               # continues segment 1: never sees it
        assert torch.isfinite(step).all()
        assert_close(torch.cat([dirty[:, 4:6], step], 1)[0], mha(x[:1, 4:7])[0], atol=4e-15,
                     what="segment 1 through the cache vs alone")


def test_hybrid_failed_call_leaves_attention_caches_as_they_were(monkeypatch):
    model = hybrid_model(seed=42)
    cache = model.allocate_inference_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5), generator=gen(43)), cache=cache)
    before = [c.state() if isinstance(c, mamba2.AttentionCache) else
              (c.conv_state.clone(), c.ssm_state.clone()) for c in cache]

    def boom(*a, **k):
        raise RuntimeError("layer 2 failed")
    monkeypatch.setattr(model.backbone.layers[2].mixer, "_through_cache", boom)
    for l in (1, 3):
        with torch.no_grad(), pytest.raises(RuntimeError, match="layer 2"):
            model(torch.randint(0, 50, (2, l), generator=gen(44)), cache=cache)
        after = cache[1].state()
        assert after[0] == before[1][0] and all(torch.equal(a, b) for a, b in
                                                zip(after[1:], before[1][1:]))
        assert torch.equal(cache[0].ssm_state, before[0][1])
        assert torch.equal(cache[0].conv_state, before[0][0])


def test_hybrid_checkpoint_in_the_official_layout(tmp_path):
    """A small checkpoint with mamba2attn-2.7b's config keys (attention at some layers, no qkv or
    out biases, d_conv 4, rotary on half of head_dim) written as mamba_ssm writes it loads, runs,
    and saves back out with the same keys."""
    config = {"d_model": 64, "d_intermediate": 0, "n_layer": 4, "vocab_size": 50,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
              "attn_layer_idx": [1, 3],
              "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 4,
                           "out_proj_bias": False, "qkv_proj_bias": False, "rotary_emb_dim": 8},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    src = randomize(Mamba2LMHeadModel(mamba2._config_from_mamba_ssm(config), dtype=torch.float32),
                    37)
    d = tmp_path / "mamba2attn"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    state = src.state_dict()
    assert "backbone.layers.1.mixer.conv1d.bias" in state          # always there, as official
    assert state["backbone.layers.1.mixer.in_proj.weight"].shape == (16 * 12, 64)
    torch.save(dict(state), d / "pytorch_model.bin")
    loaded = Mamba2LMHeadModel.from_pretrained(d)
    ids = torch.randint(0, 50, (2, 11), generator=gen(38))
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))
    assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=5),
                       src.generate(ids[:1, :4], max_new_tokens=5))
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["attn_layer_idx"] == [1, 3] and again["attn_cfg"] == config["attn_cfg"]
    with pytest.raises(ValueError, match="attention"):
        loaded.save_pretrained(tmp_path / "tf", format="transformers")


# =========================================================================================
# ==== 17. backbone and classifier
# =========================================================================================

def test_backbone_hidden_states_are_lm_pre_head(lm):
    ids = lm_ids(2, 13, seed=8)
    captured = []
    hook = lm.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        with torch.no_grad():
            logits = lm(ids)
    finally:
        hook.remove()
    backbone = Mamba2Model(lm.config, dtype=torch.float64)
    backbone.load_state_dict(lm.backbone.state_dict())
    with torch.no_grad():
        hidden = backbone(ids)
    assert hidden.shape == (2, 13, 32)
    assert torch.equal(hidden, captured[0])
    assert torch.equal(lm.lm_head(hidden), logits)


@pytest.mark.parametrize("learnable", [False, True], ids=["zeros", "learnable_init_states"])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_sequence_classification_padding_equals_alone(side, learnable):
    clf = lm_model(seed=9, cls=functools.partial(Mamba2ForSequenceClassification, num_labels=3),
                   ngroups=2, learnable_init_states=learnable)
    seqs = [lm_ids(1, n, seed=100 + n) for n in (4, 21, 13)]
    l = 21
    ids = torch.full((3, l), 5, dtype=torch.long)
    mask = torch.zeros(3, l, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = s.shape[1]
        start = {"left": l - n, "right": 0, "both": (l - n) // 2}[side]
        sl = slice(start, start + n)
        ids[i, sl], mask[i, sl] = s[0], 1
    with torch.no_grad():
        got = clf(ids, attention_mask=mask)
        alone = torch.cat([clf(s) for s in seqs])
        manual = torch.cat([clf.score(clf.backbone(s)[:, -1]) for s in seqs])
    assert got.shape == (3, 3)
    assert_close(alone, manual, atol=1e-15, what="pooled at the last token")    # measured: equal
    assert_close(got, alone, atol=2e-14, what="padded vs alone")                # measured 1.2e-15


# =========================================================================================
# ==== 18. command line
# =========================================================================================

def test_command_line_greedy_generation(tmp_path):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = ("[UNK] [PAD] [EOS] the a cat dog bird sat ran flew on under over mat house tree and "
             "then big small red blue green quick slow happy sad one two three four five").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]", eos_token="[EOS]")
    d = tmp_path / "cli_model"
    model = lm_model(seed=3, dtype=torch.float32, emb_std=1.0, vocab_size=len(words),
                     tie_embeddings=False, pad_vocab_size_multiple=8)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0     # special tokens never win: the continuation is 5 words
    model.save_pretrained(d)
    fast.save_pretrained(d)

    prompt = "the quick cat sat on"
    proc = subprocess.run([sys.executable, "mamba2.py", prompt, "--model", str(d),
                           "--max-new-tokens", "5", "--seed", "0", "--temperature", "0",
                           "--device", "cpu"],
                          cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the same generation in process: CLI defaults (repetition penalty 1.1), greedy because the
    # temperature is 0
    loaded = Mamba2LMHeadModel.from_pretrained(d)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(d))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, repetition_penalty=1.1,
                          eos_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(continuation.split()) == 5
    assert prompt in proc.stdout
    assert full in proc.stdout
    assert any("tokens/s" in line for line in proc.stdout.splitlines())
    text = proc.stdout.split("[5 tokens")[0].strip()
    assert text == full


def test_command_line_default_model_offline():
    """`python mamba2.py PROMPT` with no --model runs offline on the shipped model."""
    run = subprocess.run([sys.executable, "mamba2.py", "def add(a, b):", "--max-new-tokens", "12",
                          "--device", "cpu"],
                         cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "def add(a, b):" in run.stdout and "tokens/s" in run.stdout


CLI_MISTAKES = [
    (["hi", "--model", "/no/such/dir"], "does not exist"),
    (["hi", "--model", "README.md"], "is a file"),
    (["hi", "--model", "no-such-org/no-such-model"], "could not be fetched"),
    (["hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["hi", "--temperature", "-1"], "--temperature"),
    (["hi", "--top-p", "0"], "--top-p"),
    (["hi", "--top-k", "-3"], "--top-k"),
    (["hi", "--repetition-penalty", "0"], "--repetition-penalty"),
    ([""], "prompt is empty"),
    (["hi", "--device", "nonsense"], "--device"),
]
if not torch.cuda.is_available():
    CLI_MISTAKES.append((["hi", "--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("argv, message", CLI_MISTAKES, ids=[" ".join(a) for a, _ in CLI_MISTAKES])
def test_command_line_mistakes_are_one_line_errors(argv, message):
    run = subprocess.run([sys.executable, "mamba2.py", *argv], cwd=REPO, capture_output=True,
                         env=OFFLINE_ENV, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_command_line_non_utf8_prompt_and_closed_pipe():
    run = subprocess.run([sys.executable, "mamba2.py", os.fsdecode(b"a\xff")], cwd=REPO,
                         capture_output=True, env=OFFLINE_ENV, timeout=120)
    assert run.returncode == 2 and b"UTF-8" in run.stderr and b"Traceback" not in run.stderr
    run = subprocess.run(f"{shlex.quote(sys.executable)} mamba2.py 'def f(x):' "
                         "--max-new-tokens 300 | head -c 5", shell=True, cwd=REPO,
                         capture_output=True, env=OFFLINE_ENV, timeout=120)
    assert run.returncode == 0 and len(run.stdout) == 5, (run.returncode, run.stdout)
    assert b"Traceback" not in run.stderr and b"Error" not in run.stderr, run.stderr


# =========================================================================================
# ==== 19. the shipped model, the scripts, the notebook, the benchmark, the README
# =========================================================================================

def _held_out_stdlib_files(data: dict) -> list:
    """The standard-library files train.py held out for validation (its seeded hash of the path),
    read from this interpreter's standard library."""
    import sysconfig

    import train
    stdlib = Path(data["stdlib_dir"])
    if not stdlib.is_dir():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in train.list_stdlib_files(stdlib)
            if train.is_validation_file(p.relative_to(stdlib).as_posix(), data["val_fraction"],
                                        data["seed"])]


def test_shipped_model_loads_and_beats_the_bigram_baseline():
    """The default model is in the repo (<= 10 MB) and loads offline; its recorded validation
    loss beats the bigram baseline; its loss computed here on the held-out standard-library files
    (the first 256 tokens of each) beats that bigram baseline by a margin and is close to the
    recorded loss; and it continues Python: greedy after a `def` line comes an indented body one
    level deeper than the def (for a method too), with varied tokens and no end-of-text."""
    from transformers import AutoTokenizer
    folder = Path(mamba2.DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 10 * 2**20, f"shipped model folder is {size / 2**20:.1f} MB"
    model = Mamba2LMHeadModel.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    log = json.loads((folder / "train_log.json").read_text())
    bigram = log["final"]["baselines_full"]["bigram"]                 # 4.84 nats/token
    assert log["final"]["val_loss_full"] < bigram - 0.5               # recorded: 3.745
    files = _held_out_stdlib_files(log["data"])
    assert len(files) >= 20, [str(f) for f in files]                  # 33 for CPython 3.11.7
    rows = [tok(f.read_text(encoding="utf-8")[:4096]).input_ids[:256] for f in files]
    ids = torch.tensor([r for r in rows if len(r) == 256])
    assert ids.shape[0] >= 20
    with torch.no_grad():
        loss = model(ids, labels=ids).item()
    # Measured: 3.58 on CPython 3.11.7's 32 held-out files of >= 256 tokens; a model that had
    # lost its training (or read its weights wrongly) is at 6.7 (unigram) or above.
    assert loss < bigram - 0.5, (loss, bigram)
    assert abs(loss - log["final"]["val_loss_full"]) < 0.5, loss
    for prompt, indent in (("def fibonacci(n):", 4),
                           ("class Stack:\n    def push(self, item):", 8)):
        prompt_ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(prompt_ids, max_new_tokens=40)
        new = out[0, prompt_ids.shape[1]:]
        continuation = tok.decode(new)
        assert torch.equal(out[0, :prompt_ids.shape[1]], prompt_ids[0])
        assert continuation.startswith("\n" + " " * indent), continuation
        assert not continuation.startswith("\n" + " " * (indent + 1)), continuation
        assert len(set(new.tolist())) >= 10, continuation
        assert tok.eos_token not in continuation, continuation


def test_demo_features_script_checks_hold():
    run = subprocess.run([sys.executable, "demo_features.py"], cwd=REPO, env=OFFLINE_ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout


def test_train_quick_loss_drops(tmp_path):
    """train.py --quick: a tiny model on a tiny corpus; validation loss must fall well below its
    start, and the checkpoint it writes reloads."""
    import train
    log = train.main(["--quick", "--out", str(tmp_path / "quick")])
    val = [row["val_loss"] for row in log["history"] if row.get("val_loss") is not None]
    assert val[-1] < val[0] - 1.0, val
    reloaded = Mamba2LMHeadModel.from_pretrained(tmp_path / "quick")
    assert reloaded.config.n_layer >= 1


def test_demo_notebook_executes_offline():
    """demo.ipynb runs offline on the shipped model; its batched cell prints, for every prompt,
    whether the left-padded row equals the prompt generated alone: all must say True."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "demo.ipynb", as_version=4)
    old = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "tokens/s" in outputs and "ms per token" in outputs
    verdicts = re.findall(r"same as alone: (\w+)", outputs)
    assert verdicts == ["True", "True"], outputs        # two prompts of different lengths
    latencies = [float(ms) for ms in re.findall(r"context +\d+: ([\d.]+) ms per token", outputs)]
    assert len(latencies) == 4 and all(ms > 0 for ms in latencies), outputs


def test_bench_smoke(tmp_path):
    """The benchmark runs end to end at tiny sizes, every section reports, and the cross-checks it
    records hold: ours and transformers agree on the same weights (block output, greedy tokens,
    training loss), the memory-efficient and plain paths give the same loss, compiled equals
    eager, bf16 is close to fp32, one sequence split over 2 processes gives the loss of one; the
    decode section reports the step against its bound (with the state) for batches 1 and 8 and
    the hybrid model's latency at every context. Timings are never asserted."""
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(tmp_path)],
                         cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    results = report["results"]
    assert set(results) == {"block", "memory", "decode", "train", "bf16", "compile", "chunk",
                            "context"}
    assert (tmp_path / "bench.md").read_text().count("\n|") >= 15
    for name in ("throughput.png", "memory.png", "decode_latency.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert results["block"]["max_abs_diff_vs_transformers"] < 6e-6             # measured 6.0e-7
    decode = results["decode"]
    assert decode["generate"]["same_tokens"] is True      # the quick vocabulary has no padding
    assert {p["batch"] for p in decode["steps"]} >= {1, 8}
    assert all(p["step_over_floor_with_state"] > 0 for p in decode["steps"])
    assert len(decode["hybrid"]["contexts"]) == len(decode["contexts"])
    losses = results["train"]["loss"]
    assert losses["ours mem-eff"] == losses["ours plain"]
    # relative difference measured 1.5e-7 (fp32)
    assert abs(losses["transformers"] - losses["ours mem-eff"]) < 2e-6 * losses["ours plain"]
    assert results["compile"]["max_abs_diff"] < 1e-6                          # measured: 0
    assert results["compile"]["graph_break_count"] == 0
    assert results["bf16"]["block"]["max_rel_diff"] < 5e-2                    # measured 9.0e-3
    assert all(p["ours_over_floor"] > 0 for p in results["block"]["points"])
    # context parallelism: the same training loss on 1 and on 2 gloo processes (fp32; measured
    # 4.8e-7 apart, on a loss of 6.2)
    points = results["context"]["points"]
    assert not [p for p in points if "error" in p], points
    assert {p["ranks"] for p in points} >= {1, 2}
    assert all(p["loss_diff_vs_1"] < 5e-6 for p in points), points


# -------------------------------------------------------------------------------------- README

def _readme_python_blocks():
    """(first line number, code) of every ```python block of README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(text[:m.start(1)].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)]


README_BLOCKS = _readme_python_blocks()
# a quoted "org/name" that is no file of the repo: a hub id (a model or a tokenizer)
_HUB_ID = re.compile(r"""(["'])([A-Za-z0-9][\w.-]*/[\w.-]+)\1""")


def _offline_readme_code(code: str) -> str:
    """The block with every hub id swapped for the shipped model (which holds a tokenizer)."""
    def swap(m):
        if (REPO / m.group(2)).exists():
            return m.group(0)
        return repr(mamba2.DEFAULT_MODEL)
    return _HUB_ID.sub(swap, code)


def test_readme_python_blocks_are_found_and_their_hub_ids_swapped():
    """The extraction finds README.md's python blocks (the layer and the checkpoint examples),
    and the offline copy of each names no hub id any more (state-spaces/mamba2-130m and the
    GPT-NeoX tokenizer become the shipped model)."""
    assert len(README_BLOCKS) >= 2
    hub_ids = {m.group(2) for _, code in README_BLOCKS for m in _HUB_ID.finditer(code)
               if not (REPO / m.group(2)).exists()}
    assert hub_ids, "no hub id found: the swap below is not exercised"
    for _, code in README_BLOCKS:
        offline = _offline_readme_code(code)
        assert not [m.group(2) for m in _HUB_ID.finditer(offline)
                    if not (REPO / m.group(2)).exists()], offline


@pytest.mark.parametrize("line, code", README_BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in README_BLOCKS])
def test_readme_python_block_runs_offline(line, code):
    """Every ```python block of README.md runs, each alone in a fresh interpreter, from the repo
    root, offline: the hub ids it names are swapped for the shipped model. A block that needs what
    this machine lacks says so on its first line (`# needs: cuda` or `# needs: network`)."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    needs = re.match(r"#\s*needs:\s*(\w+)", first)
    if needs and needs.group(1) == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"README.md:{line} needs CUDA, which this machine lacks")
    if needs and needs.group(1) == "network":
        pytest.skip(f"README.md:{line} needs the network; the tests run offline")
    env = {**OFFLINE_ENV, "MPLBACKEND": "Agg", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}        # for a block that starts a process group
    run = subprocess.run([sys.executable, "-c", _offline_readme_code(code)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"README.md python block at line {line} failed (status {run.returncode}):\n"
                    f"{run.stderr[-3000:]}\n---- the block ----\n{code}", pytrace=False)


# =========================================================================================
# ==== 20. distributed training: DDP, FSDP2
# =========================================================================================

_DIST_WORKER = r'''
import datetime, os, sys
import torch
import torch.nn.functional as F
from mamba2 import Mamba2Config, Mamba2LMHeadModel

STEPS, GLOBAL_BATCH, LENGTH, VOCAB = 3, 4, 10, 40


def build_model():
    torch.manual_seed(1234)
    cfg = Mamba2Config(d_model=16, n_layer=2, d_state=4, headdim=8, d_conv=3, chunk_size=4,
                       vocab_size=VOCAB, pad_vocab_size_multiple=8)
    return Mamba2LMHeadModel(cfg, dtype=torch.float64)


def global_batch():
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH + 1),
                         generator=torch.Generator().manual_seed(99))


def train(model, ids, full=lambda t: t, prefix=""):
    """STEPS of AdamW on next-token cross entropy; returns (losses, gradients after step 1,
    final weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    name = lambda n: n[len(prefix):] if n.startswith(prefix) else n
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if step == 0:
            grads = {name(n): full(p.grad).detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach().clone())
    weights = {name(n): full(p).detach().clone() for n, p in model.named_parameters()}
    return torch.stack(losses), grads, weights


def run_rank(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ids = global_batch().chunk(world)[rank]            # each rank: its half of the global batch
    results = {}
    from torch.nn.parallel import DistributedDataParallel as DDP
    losses, grads, weights = train(DDP(build_model()), ids, prefix="module.")
    dist.all_reduce(losses)
    results["ddp"] = dict(losses=losses / world, grads=grads, weights=weights)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        model = build_model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.backbone.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        losses, grads, weights = train(model, ids, full=lambda t: t.full_tensor())
        dist.all_reduce(losses)
        results["fsdp"] = dict(losses=losses / world, grads=grads, weights=weights)
    except Exception as e:  # reported by the test as the skip reason
        results["fsdp_error"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    # Leave without the interpreter's and c10d's teardown: under heavy load a gloo rank
    # occasionally aborted there ("terminate called without an active exception", exit -6) after
    # all work was done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
'''


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """Two gloo processes train the same tiny LM with DDP, then with FSDP2; plus the
    single-process run."""
    tmp = tmp_path_factory.mktemp("dist")
    script, out = tmp / "worker.py", tmp / "rank0.pt"
    script.write_text(_DIST_WORKER)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:           # only our own two children, by handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(logs)[-4000:]
    assert out.is_file(), "\n".join(logs)[-4000:]
    ns = {"__name__": "mamba2_dist_worker"}
    exec(compile(_DIST_WORKER, str(script), "exec"), ns)
    single = ns["train"](ns["build_model"](), ns["global_batch"]())
    return torch.load(out, weights_only=True), single, ns


def _compare_training(got: dict, single, build_model):
    losses, grads, weights = single
    # float64; measured (DDP and FSDP2): losses 4.4e-16, gradients 2.8e-17, weights 2.2e-16
    assert_close(got["losses"], losses, atol=5e-15, what="losses")
    assert set(got["grads"]) == set(grads) and set(got["weights"]) == set(weights)
    for n in grads:
        assert got["grads"][n].shape == grads[n].shape, n
        assert_close(got["grads"][n], grads[n], atol=3e-16, what=f"gradient of {n}")
    for n in weights:
        assert_close(got["weights"][n], weights[n], atol=3e-15, what=f"trained {n}")
    # the training really moved the weights and the loss: the comparison is not between untouched
    # copies
    init = dict(build_model().named_parameters())
    assert max((weights[n] - init[n]).abs().max().item() for n in weights) > 1e-3
    assert losses[-1] < losses[0]


def test_ddp_two_processes_equal_single_process_full_batch(dist_runs):
    results, single, ns = dist_runs
    _compare_training(results["ddp"], single, ns["build_model"])


def test_fsdp2_fully_shard_two_processes_equal_single_process_full_batch(dist_runs):
    results, single, ns = dist_runs
    if "fsdp_error" in results:
        pytest.skip(f"FSDP2 fully_shard on CPU/gloo failed in torch {torch.__version__}: "
                    f"{results['fsdp_error']}")
    _compare_training(results["fsdp"], single, ns["build_model"])


# =========================================================================================
# ==== 21. context parallelism: one sequence across 2 and 4 gloo processes
# =========================================================================================
# Context parallelism (cp_group): one sequence split across 2 and 4 gloo processes on CPU gives
# the single-process whole exactly (float64, 1e-12): outputs, final states, the loss, the parameter
# gradients summed over the ranks and each rank's input gradients; with packing across the rank
# boundaries, the memory-efficient path on and off, learned initial states, hybrid attention layers,
# and a prefill whose last-rank cache is one process's. Each K runs one group of processes doing
# every check; the test asserts what they report.

def _pieces(l, k, seed):
    """k contiguous pieces of [0, l) of random, unequal lengths (some may be one token)."""
    cuts = torch.randperm(l - 1, generator=torch.Generator().manual_seed(seed))[:k - 1] + 1
    bounds = [0] + sorted(cuts.tolist()) + [l]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def _max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _summed_grads(module, dist):
    out = {}
    for name, p in module.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(g)
        out[name] = g
    return out


def _block_case(rank, k, dist, mamba2, cfg, packed, with_initial, l=37, seed=0):
    """Errors of one block split over the ranks against the block on the whole sequence."""
    torch.manual_seed(seed)
    block = mamba2.Mamba2(mamba2.Mamba2Config(**cfg), dtype=F64, layer_idx=3)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    c = block.config
    g = torch.Generator().manual_seed(seed + 1)
    b = 2
    u = torch.randn(b, l, c.d_model, generator=g, dtype=F64)
    w = torch.randn(b, l, c.d_model, generator=g, dtype=F64)
    ws = torch.randn(b, c.nheads, c.headdim, c.d_state, generator=g, dtype=F64)
    h0 = torch.randn(b, c.nheads, c.headdim, c.d_state, generator=g, dtype=F64) \
        if with_initial else None
    seq = None
    if packed:       # segments that cross the rank boundaries, and some that start on them
        lengths = [[5, 1, 17, l - 23], [l]] if l >= 30 else [[l // 2, l - l // 2], [l]]
        seq = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    x = u.clone().requires_grad_()
    h = None if h0 is None else h0.clone().requires_grad_()
    y, S = block(x, seq_idx=seq, initial_states=h, return_final_states=True)
    ((y * w).sum() + (S * ws).sum()).backward()
    want = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    s, e = _pieces(l, k, seed + 2)[rank]
    xr = u[:, s:e].clone().requires_grad_()
    hr = None if h0 is None or rank > 0 else h0.clone().requires_grad_()
    yr, Sr = block(xr, seq_idx=None if seq is None else seq[:, s:e], initial_states=hr,
                   return_final_states=True, cp_group=dist.group.WORLD)
    loss = (yr * w[:, s:e]).sum() + ((Sr * ws).sum() if rank == k - 1 else 0)
    loss.backward()
    errs = {"y": _max_err(yr, y[:, s:e]), "final state": _max_err(Sr, S),
            "input grad": _max_err(xr.grad, x.grad[:, s:e])}
    if hr is not None:
        errs["initial_states grad"] = _max_err(hr.grad, h.grad)
    for name, grad in _summed_grads(block, dist).items():
        errs[f"grad {name}"] = _max_err(grad, want[name])
    return errs


def _lm(mamba2, cfg, seed=0):
    torch.manual_seed(seed)
    model = mamba2.Mamba2LMHeadModel(mamba2.Mamba2Config(**cfg), dtype=F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _lm_case(rank, k, dist, mamba2, cfg, packed, l=29, seed=0):
    """Logits, loss and gradients of a language model split over the ranks vs the whole."""
    model = _lm(mamba2, cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg["vocab_size"], (2, l), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100                                   # ignored targets count as the whole's
    seq = torch.tensor([[0] * 11 + [1] * (l - 11), [0] * l]) if packed else None
    logits = model(ids, seq_idx=seq)
    loss = model(ids, seq_idx=seq, labels=labels)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    s, e = _pieces(l, k, seed + 2)[rank]
    piece = None if seq is None else seq[:, s:e]
    group = dist.group.WORLD
    with torch.no_grad():
        logits_r = model(ids[:, s:e], seq_idx=piece, cp_group=group)
    loss_r = model(ids[:, s:e], seq_idx=piece, labels=labels[:, s:e], cp_group=group)
    loss_r.backward()
    errs = {"logits": _max_err(logits_r, logits[:, s:e]), "loss": abs(loss_r.item() - loss.item())}
    for name, grad in _summed_grads(model, dist).items():
        errs[f"grad {name}"] = _max_err(grad, want[name])
    return errs


def _prefill_case(rank, k, dist, mamba2, cfg, l=23, seed=0):
    """A prompt prefilled across the ranks leaves, on the last rank, one process's caches, and
    greedy decoding from them continues as one process does."""
    model = _lm(mamba2, cfg, seed)
    ids = torch.randint(0, cfg["vocab_size"], (2, l), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        one = model.allocate_inference_cache(2, max_seqlen=64)
        model(ids, cache=one)
        want = model.generate(ids, max_new_tokens=6)[:, l:]
        mine = model.allocate_inference_cache(2, max_seqlen=64)
        s, e = _pieces(l, k, seed + 3)[rank]
        logits = model(ids[:, s:e], cache=mine, cp_group=dist.group.WORLD)
        errs = {}
        if rank == k - 1:
            tensors = [[t for c in caches for t in mamba2._cache_tensors(c)]
                       for caches in (one, mine)]
            for i, (a, b) in enumerate(zip(*tensors)):
                errs[f"cache tensor {i}"] = _max_err(a.double(), b.double())
            tokens = []
            for _ in range(6):
                nxt = logits[:, -1, :cfg["vocab_size"]].argmax(-1)
                tokens.append(nxt)
                logits = model(nxt[:, None], cache=mine)
            errs["decoded tokens differ"] = float((torch.stack(tokens, 1) != want).sum())
    return errs


def _bytes_case(rank, k, dist, mamba2):
    """Bytes one block sends per call, for two lengths: the state and conv window only."""
    sent = []
    real_send = dist.send

    def counting_send(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real_send(tensor, *args, **kwargs)

    dist.send = counting_send
    try:
        torch.manual_seed(0)
        block = mamba2.Mamba2(mamba2.Mamba2Config(d_model=16, d_state=8, headdim=8), dtype=F64)
        out = {}
        for l in (64, 1024):
            sent.clear()
            u = torch.randn(1, l, 16, dtype=F64, requires_grad=True)
            block(u, cp_group=dist.group.WORLD).sum().backward()
            out[l] = sum(sent)
        return {"bytes": out}
    finally:
        dist.send = real_send


def _errors_case(rank, k, dist, mamba2):
    """Mistakes are named errors on every rank, before anything is sent."""
    block = mamba2.Mamba2(mamba2.Mamba2Config(d_model=8, d_state=4, headdim=4), dtype=F64)
    lm = mamba2.Mamba2LMHeadModel(mamba2.Mamba2Config(d_model=8, n_layer=2, vocab_size=50,
                                                     d_state=4, headdim=4), dtype=F64)
    other = mamba2.Mamba2(mamba2.Mamba2Config(d_model=8, d_state=2, headdim=4), dtype=F64)
    group = dist.group.WORLD
    seen = {}

    def autocast_call(on):
        b32 = mamba2.Mamba2(mamba2.Mamba2Config(d_model=8, d_state=4, headdim=4))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            return b32(torch.randn(1, 5, 8), cp_group=group)

    def warm_prefill():
        cache = lm.allocate_inference_cache(1)
        if rank == 1:
            lm(torch.ones(1, 2, dtype=torch.long), cache=cache)
        return lm(torch.ones(1, 3, dtype=torch.long), cache=cache, cp_group=group)

    cases = {
        "batch": lambda: block(torch.randn(1 + rank % 2, 5, 8, dtype=F64), cp_group=group),
        "initial": lambda: block(torch.randn(1, 5, 8, dtype=F64), cp_group=group,
                                 initial_states=torch.zeros(1, 4, 4, 4, dtype=F64)),
        "group": lambda: block(torch.randn(1, 5, 8, dtype=F64), cp_group="world"),
        "ids on one rank": lambda: lm(torch.full((1, 4), 60 if rank == k - 1 else 1),
                                      cp_group=group),
        "labels on one rank": lambda: lm(torch.ones(1, 4, dtype=torch.long), cp_group=group,
                                         labels=torch.ones(1, 3 + (rank != 0),
                                                           dtype=torch.long)),
        "cu_seqlens": lambda: block(torch.randn(1, 5, 8, dtype=F64), cp_group=group,
                                    cu_seqlens=torch.tensor([0, 5])),
        "final states on one rank": lambda: block(torch.randn(1, 5, 8, dtype=F64), cp_group=group,
                                                  return_final_states=rank == 0),
        "labels on one rank only": lambda: lm(torch.ones(1, 4, dtype=torch.long), cp_group=group,
                                              labels=torch.ones(1, 4, dtype=torch.long)
                                              if rank == 0 else None),
        "another block on one rank": lambda: (other if rank == 0 else block)(
            torch.randn(1, 5, 8, dtype=F64), cp_group=group),
        "autocast on one rank": lambda: autocast_call(rank == 0),
        "a cache that holds state": lambda: warm_prefill(),
    }
    for name, call in cases.items():
        try:
            call()
            seen[name] = "no error"
        except (ValueError, TypeError) as e:
            seen[name] = f"{type(e).__name__}: {e}"
    dist.barrier()
    return {"errors": seen}


def _worker(rank, k, path, out_dir):
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    import mamba2
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=k)
    block_cfg = dict(d_model=8, d_state=4, headdim=4, chunk_size=4, ngroups=2)
    results = {}
    for name, cfg, packed, initial in [
            ("block", block_cfg, False, False),
            ("block packed, learned init", {**block_cfg, "learnable_init_states": True}, True,
             False),
            ("block packed, mem-eff off, initial_states",
             {**block_cfg, "use_mem_eff_path": False, "D_has_hdim": True}, True, True),
            ("block d_conv 2, dt_limit", {**block_cfg, "d_conv": 2, "dt_limit": (0.01, 0.5)},
             False, True)]:
        results[name] = _block_case(rank, k, dist, mamba2, cfg, packed, initial)
    lm_cfg = dict(d_model=16, n_layer=3, vocab_size=50, pad_vocab_size_multiple=8, d_state=4,
                  headdim=4, chunk_size=4, d_intermediate=24)
    hybrid = {**lm_cfg, "attn_layer_idx": [1], "attn_cfg": dict(num_heads=4, num_heads_kv=2,
                                                                 rotary_emb_dim=2, d_conv=3,
                                                                 causal=True)}
    results["lm"] = _lm_case(rank, k, dist, mamba2, lm_cfg, False)
    results["lm packed, mem-eff off"] = _lm_case(rank, k, dist, mamba2,
                                                 {**lm_cfg, "use_mem_eff_path": False}, True)
    results["hybrid lm packed"] = _lm_case(rank, k, dist, mamba2, hybrid, True)
    results["prefill"] = _prefill_case(rank, k, dist, mamba2, lm_cfg)
    results["hybrid prefill"] = _prefill_case(rank, k, dist, mamba2, hybrid)
    results.update(_bytes_case(rank, k, dist, mamba2))
    results.update(_errors_case(rank, k, dist, mamba2))
    Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(k):
    import torch.multiprocessing as mp
    out = tempfile.mkdtemp()
    path = os.path.join(out, "rendezvous")
    mp.spawn(_worker, args=(k, path, out), nprocs=k)
    return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(k)]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def cp_results(request):
    return request.param, _run(request.param)


def test_context_parallel_equals_the_whole_sequence(cp_results):
    k, ranks = cp_results
    for rank, res in enumerate(ranks):
        for case, errs in res.items():
            if case in ("bytes", "errors"):
                continue
            for what, err in errs.items():
                assert err <= 1e-12, f"{k} ranks, rank {rank}, {case}: {what} off by {err:.2e}"
    last = ranks[-1]
    assert any(key.startswith("cache tensor") for key in last["prefill"])
    assert any(key.startswith("cache tensor") for key in last["hybrid prefill"])


def test_context_parallel_sends_only_states(cp_results):
    """Bytes a rank sends for one block's forward and backward do not grow with the length: the
    state (h p n) and the conv window (conv_dim d_conv) in float64 go forward to the next rank
    and their gradients back to the previous one, nothing else."""
    k, ranks = cp_results
    h, p, n, conv_dim, d_conv = 4, 8, 8, 32 + 2 * 8, 4       # d_model 16, d_state 8, headdim 8
    one_way = (h * p * n + conv_dim * d_conv) * 8
    for rank, res in enumerate(ranks):
        by_length = {int(l): b for l, b in res["bytes"].items()}
        ways = (rank < k - 1) + (rank > 0)                     # forward on, backward back
        assert by_length == {64: ways * one_way, 1024: ways * one_way}, (rank, by_length)


def test_context_parallel_mistakes_are_named_errors(cp_results):
    k, ranks = cp_results
    for rank, res in enumerate(ranks):
        e = res["errors"]
        assert e["batch"].startswith("ValueError") and "batch size" in e["batch"], e["batch"]
        want = "first rank" if rank > 0 else "rank(s) [1"
        assert e["initial"].startswith("ValueError") and want in e["initial"], e["initial"]
        assert e["group"].startswith("TypeError") and "cp_group" in e["group"], e["group"]
        assert e["cu_seqlens"].startswith("ValueError") and "seq_idx" in e["cu_seqlens"]
        for case, what in (("final states on one rank", "return_final_states"),
                           ("labels on one rank only", "labels_given"),
                           ("another block on one rank", "d_state"),
                           ("autocast on one rank", "autocast")):
            assert e[case].startswith("ValueError") and f"agree in {what}" in e[case], e[case]
        for case, culprit, says in (("ids on one rank", k - 1, "vocab_size"),
                                    ("labels on one rank", 0, "labels"),
                                    ("a cache that holds state", 1, "fresh")):
            want = says if rank == culprit else f"rank(s) [{culprit}] refused"
            assert e[case].startswith("ValueError") and want in e[case], (case, e[case])


# =========================================================================================
# ==== 22. train.py on several processes: DDP, FSDP2, context parallelism
# =========================================================================================
# train.py under torchrun: DDP, FSDP2 and context parallelism equal one process.
#
# Every multi-rank run is a real ``python -m torch.distributed.run --standalone`` job of gloo
# CPU processes on a tiny float64 model; the reference is the one-process ``train.main`` on the
# same data and the same global batches. Tolerance 1e-6 everywhere (float64: the measured
# differences are ~1e-15, reductions in another order).

TOL = 1e-6
SEED = 3
# 4 steps of 2 micro-batches of a global batch of 4 sequences of 16 tokens; lr high enough that
# the weights move well beyond the tolerance. 5 validation windows: on 2 ranks one rank has a
# window less (the collective-alignment path of evaluate).
ARGS = ["--d-model", "32", "--n-layer", "2", "--d-state", "8", "--headdim", "8",
        "--chunk-size", "8", "--seq-len", "16", "--batch-size", "4", "--grad-accum", "2",
        "--steps", "4", "--warmup", "2", "--lr", "1e-2", "--eval-interval", "2",
        "--log-interval", "1", "--ckpt-interval", "2", "--eval-tokens", "0",
        "--dtype", "float64", "--save-dtype", "float64", "--sample-tokens", "0",
        "--seed", str(SEED), "--threads", "1", "--device", "cpu"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# Runs the script HARNESS_TRAIN (train.py) as __main__, under torchrun; with
# HARNESS_GUARD_OUT=DIR, on ranks other than 0 every write under DIR (open for writing, os.open
# with write flags, rename/replace, mkdir, remove) raises PermissionError and fails the run.
HARNESS = r'''
import os, runpy, sys
from pathlib import Path

guard = os.environ.get("HARNESS_GUARD_OUT")
if guard and os.environ.get("RANK", "0") != "0":
    guarded = Path(guard).resolve()

    def under(p):
        try:
            return Path(os.fsdecode(p)).resolve().is_relative_to(guarded)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writes else []
        elif event == "os.rename":
            paths = list(args[:2])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
            paths = [args[0]]
        else:
            return
        for p in paths:
            if under(p):
                raise PermissionError(f"rank {os.environ['RANK']} wrote {p} ({event})")

    sys.addaudithook(hook)

sys.argv = [os.environ["HARNESS_TRAIN"]] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared-format data folder (meta.json, train.pt, val.pt): bytes of mamba2.py."""
    d = tmp_path_factory.mktemp("data")
    text = list((REPO / "mamba2.py").read_bytes()[:6000])
    torch.save(torch.tensor([256] + text[:5900], dtype=torch.int16), d / "train.pt")
    torch.save(torch.tensor([256] + text[5900:5983], dtype=torch.int16), d / "val.pt")
    (d / "meta.json").write_text(json.dumps({"name": "bytes", "vocab_size": 257, "eos_id": 256}))
    return d


def one_process(out: Path, data: Path, *extra: str) -> dict:
    """train.main in this process, as `python train.py` runs it (no torchrun variables)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for name in DIST_ENV:
            mp.delenv(name, raising=False)
        try:
            return train.main([*ARGS, "--data", str(data), "--out", str(out), *extra])
        finally:
            torch.set_num_threads(threads)


def torchrun(n: int, out: Path, data: Path, *extra: str, harness: Path | None = None,
             env: dict | None = None) -> str:
    """A torchrun job of n gloo ranks; returns its output (stdout and stderr), asserts rc 0."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    clean.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HARNESS_TRAIN=str(REPO / "train.py"),
                 **(env or {}))
    script = str(harness) if harness else str(REPO / "train.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), script, *ARGS, "--data", str(data), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=clean, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("harness") / "harness.py"
    path.write_text(HARNESS)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """The one-process run: 4 steps, to the end (final export)."""
    out = tmp_path_factory.mktemp("single") / "run"
    one_process(out, data_dir)
    return out


def load_run(out: Path) -> dict:
    ckpt = torch.load(out / "ckpt" / "ckpt.pt", map_location="cpu", weights_only=False)
    return {"log": json.loads((out / "train_log.json").read_text()), "ckpt": ckpt}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def compare(got: Path, want: Path, exported: bool = True) -> dict:
    """Assert two runs equal within TOL (history, checkpoint, exported weights); return the
    measured max |difference| of each."""
    g, w = load_run(got), load_run(want)
    rows_g, rows_w = g["log"]["history"], w["log"]["history"]
    assert [(r["step"], r["tokens_seen"]) for r in rows_g] == \
        [(r["step"], r["tokens_seen"]) for r in rows_w]
    d_loss = 0.0
    for rg, rw in zip(rows_g, rows_w):
        for key in ("train_loss", "val_loss", "lr"):
            assert (rg[key] is None) == (rw[key] is None), (key, rg, rw)
            if rw[key] is not None:
                d_loss = max(d_loss, abs(rg[key] - rw[key]))
    assert d_loss <= TOL, (rows_g, rows_w)
    cg, cw = g["ckpt"], w["ckpt"]
    assert cg["step"] == cw["step"] and cg["tokens_seen"] == cw["tokens_seen"]
    d_weights = max_diff(cg["model"], cw["model"])
    assert d_weights <= TOL
    og, ow = cg["optimizer"], cw["optimizer"]
    assert sorted(og["state"]) == sorted(ow["state"]) == list(range(len(ow["state"])))
    for gg, gw in zip(og["param_groups"], ow["param_groups"]):   # betas may come back a list
        assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in gg.items()} == \
            {k: (tuple(v) if isinstance(v, list) else v) for k, v in gw.items()}
    d_optim = max(max_diff(og["state"][i], ow["state"][i]) for i in ow["state"])
    assert d_optim <= TOL
    assert torch.equal(cg["rng"]["batches"], cw["rng"]["batches"])   # the same batches drawn
    result = {"loss": d_loss, "weights": d_weights, "optimizer": d_optim}
    if exported:
        result["exported"] = max_diff(
            dict(Mamba2LMHeadModel.from_pretrained(got).state_dict()),
            dict(Mamba2LMHeadModel.from_pretrained(want).state_dict()))
        assert result["exported"] <= TOL
    print(f"\n{got.name} vs {want.name}: max |diff| {result}")
    return result


def assert_trained(out: Path) -> None:
    """The compared run really trained: val loss fell, the weights left their initial draw."""
    run = load_run(out)
    val = [r["val_loss"] for r in run["log"]["history"] if r["val_loss"] is not None]
    assert len(val) == 3 and val[-1] < val[0] - 0.1, val
    torch.manual_seed(SEED)                                 # train.py's initial draw
    init = Mamba2LMHeadModel(Mamba2Config(**run["ckpt"]["config"]), dtype=torch.float64)
    assert max_diff(dict(init.state_dict()), run["ckpt"]["model"]) > 1e-2


# --------------------------------------------------------------------------- units

def test_each_rank_reads_its_own_rows_and_pieces():
    """get_batch: the ranks of a world read disjoint rows that together are the one-process
    batch; cp_piece: the group's pieces, in group-rank order, are the whole windows."""
    data = torch.arange(1000)
    whole = train.get_batch(data, 6, 8, torch.Generator().manual_seed(5), "cpu")
    dp = [train.Dist(rank=r, world=3) for r in range(3)]
    parts = [train.get_batch(data, 6, 8, torch.Generator().manual_seed(5), "cpu", d.rows(6))
             for d in dp]
    assert [p.shape[0] for p in parts] == [2, 2, 2]
    assert torch.equal(torch.cat(parts), whole)
    ranks = [train.Dist(rank=r, world=4, cp=2) for r in range(4)]   # dp 2 x cp 2
    assert [(d.dp_rank, d.cp_rank) for d in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pieces = [train.cp_piece(whole[ranks[r].rows(6)], ranks[r]) for r in range(4)]
    assert [p.shape[1] for p in pieces] == [4, 5, 4, 5]   # the last also holds the final target
    assert torch.equal(torch.cat([torch.cat(pieces[:2], 1), torch.cat(pieces[2:], 1)]), whole)


def test_sample_goes_through_generate():
    """sample() is model.generate (one prefill forward, then cached steps), seeded."""
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=32, n_layer=1, d_state=8, headdim=8,
                                           chunk_size=8, vocab_size=50))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    ids = train.sample(model, [1, 2, 3], 12, seed=4)
    assert len(ids) == 12 and len(calls) == 1 and model.training
    want = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=12, do_sample=True,
                          temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(4))
    assert ids == want[0, 3:].tolist()


@pytest.mark.parametrize("env, extra, message", [
    ({"WORLD_SIZE": "2"}, ["--batch-size", "5"],
     "--batch-size 5 is the global batch: it must be divisible by the 2 data-parallel ranks"),
    ({"WORLD_SIZE": "4"}, ["--batch-size", "5", "--context-parallel", "2"],
     "--batch-size 5 is the global batch: it must be divisible by the 2 data-parallel ranks "
     "(world size 4 / context-parallel 2)"),
    ({"WORLD_SIZE": "2"}, ["--context-parallel", "2", "--seq-len", "15"],
     "--seq-len 15 must be divisible by --context-parallel 2"),
    ({"WORLD_SIZE": "3"}, ["--context-parallel", "2", "--batch-size", "3"],
     "--context-parallel 2 must divide the world size 3"),
    ({}, ["--fsdp"], "--fsdp and --context-parallel need several ranks"),
])
def test_layout_mistakes_are_clear_errors(monkeypatch, capsys, tmp_path, env, extra, message):
    """Checked from torchrun's variables before any process group: 'error: ...', status 2."""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    for k, v in {**env, **({"RANK": "0"} if env else {})}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        train.main(["--quick", "--out", str(tmp_path / "x"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_context_parallel_needs_the_library_argument(monkeypatch, capsys, tmp_path):
    """A mamba2.py whose forward has no cp_group: --context-parallel 2 is refused up front."""
    def forward(self, input_ids, cache=None, seq_idx=None, num_last_tokens=0, labels=None):
        raise AssertionError("not reached")
    monkeypatch.setattr(Mamba2LMHeadModel, "forward", forward)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.main(["--quick", "--out", str(tmp_path / "x"), "--context-parallel", "2"])
    err = capsys.readouterr().err
    assert "error: --context-parallel > 1 needs Mamba2LMHeadModel.forward(..., cp_group=...)" \
        in err


# --------------------------------------------------------------------------- torchrun

def test_ddp_two_ranks_equal_one_process_and_rank0_alone_writes(tmp_path, data_dir, reference,
                                                                 harness):
    """2 DDP ranks, 2 sequences each of every global batch: losses (train and the all-reduced
    val), weights, optimizer state and exported model equal the one-process run. Ranks other
    than 0 run with every write into --out refused (audit hook); rank 0 alone prints."""
    out = tmp_path / "ddp"
    output = torchrun(2, out, data_dir, harness=harness, env={"HARNESS_GUARD_OUT": str(out)})
    assert "world: 2 ranks (DDP, 2 data parallel x 1 context parallel), 2 sequences per rank" \
        in output
    assert output.count("data: bytes") == 1 and output.count("saved ") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not list(out.rglob("*.tmp"))
    compare(out, reference)
    assert_trained(reference)


def test_fsdp2_two_ranks_equal_one_process_and_resume_across_world_sizes(tmp_path, data_dir,
                                                                         reference):
    """FSDP2 fully_shard on 2 ranks, and --resume across world sizes, both ways:
    (a) FSDP2 x2 trains steps 1-2 and saves (gathered, whole) == one process at step 2;
    (b) one process resumes that checkpoint for steps 3-4 == the 4-step one-process run;
    (c) one process trains steps 1-2, FSDP2 x2 resumes it (set_*_state_dict) for steps 3-4 ==
        the 4-step one-process run (weights, optimizer, log, exported model)."""
    half = tmp_path / "single_half"
    one_process(half, data_dir, "--stop-after", "2")

    fsdp_half = tmp_path / "fsdp_half"
    output = torchrun(2, fsdp_half, data_dir, "--fsdp", "--stop-after", "2")
    assert "(FSDP2, 2 data parallel x 1 context parallel)" in output
    compare(fsdp_half, half, exported=False)                                   # (a)

    two_to_one = tmp_path / "two_to_one"
    two_to_one.mkdir()
    (two_to_one / "ckpt").mkdir()
    (two_to_one / "ckpt" / "ckpt.pt").write_bytes((fsdp_half / "ckpt" / "ckpt.pt").read_bytes())
    one_process(two_to_one, data_dir, "--resume")
    compare(two_to_one, reference)                                             # (b)

    torchrun(2, half, data_dir, "--fsdp", "--resume")
    compare(half, reference)                                                   # (c)


def test_context_parallel_two_ranks_equal_one_process(tmp_path, data_dir, reference):
    """2 ranks, --context-parallel 2, the library's own cp_group == one process."""
    if "cp_group" not in train.inspect.signature(Mamba2LMHeadModel.forward).parameters:
        pytest.skip("Mamba2LMHeadModel.forward has no cp_group argument yet (library work in "
                    "progress); train.py refuses --context-parallel > 1 until it has")
    out = tmp_path / "cp"
    output = torchrun(2, out, data_dir, "--context-parallel", "2")
    assert "(DDP, 1 data parallel x 2 context parallel), 4 sequences per rank" in output
    compare(out, reference)


def test_context_parallel_with_data_parallel_and_fsdp2(tmp_path, data_dir, reference):
    """4 ranks: 2 data-parallel groups x 2 context-parallel ranks, FSDP2 over all four (the
    gradient scaling of wrap_model with sharding) == one process."""
    if "cp_group" not in train.inspect.signature(Mamba2LMHeadModel.forward).parameters:
        pytest.skip("Mamba2LMHeadModel.forward has no cp_group argument yet")
    out = tmp_path / "fsdp_cp"
    output = torchrun(4, out, data_dir, "--fsdp", "--context-parallel", "2")
    assert "(FSDP2, 2 data parallel x 2 context parallel), 2 sequences per rank" in output
    compare(out, reference)


GUARD_PROBE = r'''
import os, sys
from pathlib import Path
import torch
import train
from mamba2 import Mamba2Config, Mamba2LMHeadModel

out = Path(os.environ["HARNESS_GUARD_OUT"])
model = Mamba2LMHeadModel(Mamba2Config(d_model=16, n_layer=1, d_state=4, headdim=8,
                                       vocab_size=16))
attempts = {
    "save_checkpoint": lambda: train.save_checkpoint(out / "ckpt" / "ckpt.pt", {"a": 1}),
    "save_pretrained": lambda: model.save_pretrained(out),
    "write_log": lambda: train.write_log({"a": 1}, out),
    "mkdir": lambda: (out / "sub").mkdir(),
    "replace": lambda: os.replace(sys.argv[1], out / "moved"),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "WROTE")
    except PermissionError:
        print(name, "refused")
(Path(sys.argv[1]).parent / "elsewhere.txt").write_text("fine")   # outside DIR: allowed
print("done")
'''


def test_the_write_guard_refuses_every_kind_of_write(tmp_path, harness):
    """The guard of the DDP test is not vacuous: on rank 1 each way train.py writes is refused."""
    probe, guarded, src = tmp_path / "probe.py", tmp_path / "out", tmp_path / "src.txt"
    probe.write_text(GUARD_PROBE)
    guarded.mkdir()
    src.write_text("x")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(RANK="1", PYTHONPATH=str(REPO), HARNESS_TRAIN=str(probe),
               HARNESS_GUARD_OUT=str(guarded), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(harness), str(src)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.split()
    assert lines.count("refused") == 5 and "WROTE" not in lines and lines[-1] == "done", lines
    # safetensors writes its temporary file from Rust, unseen by the audit hook; save_pretrained's
    # next steps (open for fsync, rename) are seen, so the attempt fails all the same.
    assert all(p.name.startswith(".model.safetensors.") and p.name.endswith(".tmp")
               for p in guarded.iterdir()), list(guarded.iterdir())
    assert (tmp_path / "elsewhere.txt").read_text() == "fine"


# =========================================================================================
# ==== 23. checkpoints: exact dtypes, journal-committed saves
# =========================================================================================
# Checkpoint defects: exact low-precision round trips, a save that is atomic across its files
# (a journal completed by the next load or save), no removal of files that are not weights, and
# named errors for directories that cannot be made. Tiny models; the whole file runs in seconds.

FORMATS = ["mamba_ssm", "transformers", "full"]
IDS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and leaves the other core to whoever shares it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed, dtype=None, **kw):
    cfg = dict(d_model=16, d_state=8, headdim=4, chunk_size=4, n_layer=2, vocab_size=40)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config(**cfg), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
            # D: fp32 values (in a bf16 / fp16 model too) that a bf16 / fp16 rounding changes
            p.copy_(1 + noise + 1e-4 if name.endswith(".D") else p.double() + noise)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k


# ========================================================================= 1. exact round trips

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision_model_round_trip_is_bit_exact(tmp_path, dtype, fmt):
    """D stays fp32 in a bf16/fp16 model (as official); it must come back as saved, not rounded
    through the checkpoint's majority dtype — with dtype=None and with the explicit dtype."""
    model = _model(1, dtype=dtype)
    D = model.backbone.layers[0].mixer.D
    assert D.dtype == torch.float32 and not torch.equal(D, D.to(dtype).float())
    model.save_pretrained(tmp_path, format=fmt)
    for kw in ({}, {"dtype": dtype}, {"dtype": str(dtype).removeprefix("torch.")}):
        back = Mamba2LMHeadModel.from_pretrained(tmp_path, **kw)
        _assert_same_state(model, back)
        assert torch.equal(_logits(back), _logits(model))


def _mixed_file(tmp_path):
    """An fp32 checkpoint rewritten as fp16 weights with fp32 D and A_log (as mamba2-2.7b)."""
    from safetensors.torch import load_file, save_file
    _model(2).save_pretrained(tmp_path, format="full")
    state = load_file(str(tmp_path / "model.safetensors"))
    mixed = {k: v if k.endswith((".D", ".A_log")) else v.half() for k, v in state.items()}
    save_file(mixed, str(tmp_path / "model.safetensors"))
    return mixed


def test_mixed_dtype_file_loads_fp32_D_exactly(tmp_path):
    mixed = _mixed_file(tmp_path)
    for dtype in (None, torch.float16, torch.bfloat16, torch.float32):
        back = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=dtype)
        want_dtype = dtype or torch.float16
        for k, v in back.state_dict().items():
            stored = mixed[k if k != "lm_head.weight" else "backbone.embedding.weight"]
            if k.endswith(".D"):           # fp32 in every model here: the stored value exactly
                assert v.dtype == torch.float32 and torch.equal(v, stored), (dtype, k)
            else:                          # one conversion from the stored dtype
                assert v.dtype == want_dtype and torch.equal(v, stored.to(want_dtype)), (dtype, k)


def test_explicit_low_dtype_of_fp32_checkpoint_keeps_D_exact(tmp_path):
    model = _model(3)
    model.save_pretrained(tmp_path, format="full")
    back = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in back.state_dict().items():
        want = model.state_dict()[k]
        if k.endswith(".D"):
            assert v.dtype == torch.float32 and torch.equal(v, want), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, want.bfloat16()), k
    loaded = mamba2.load_checkpoint_tensors(tmp_path)      # one dtype for all, as documented
    assert loaded["backbone.embedding.weight"].dtype == torch.float32


# ====================================================================== 2. atomic across files

OLD_KW, NEW_KW = {}, {"dt_limit": (0.0, 3.0)}     # configs that differ but fit either weights
SCENARIOS = {   # old save, new save
    "sharded_to_single": (dict(format="transformers", max_shard_size=4000),
                          dict(format="transformers")),
    "single_to_sharded": (dict(format="full"), dict(format="transformers", max_shard_size=4000)),
    "mamba_ssm_to_transformers": (dict(format="mamba_ssm"),
                                  dict(format="transformers", max_shard_size=4000)),
    "transformers_to_mamba_ssm": (dict(format="transformers", max_shard_size=4000),
                                  dict(format="mamba_ssm")),
}


def _snapshot(d):
    model = Mamba2LMHeadModel.from_pretrained(d)
    return model.config, model.state_dict(), _logits(model), sorted(p.name for p in d.iterdir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """For each scenario: a directory holding the old checkpoint, and (config, state, logits,
    file names) of the old and of the new checkpoint, each saved cleanly."""
    old, new = _model(4, **OLD_KW), _model(5, **NEW_KW)
    out = {}
    for name, (old_kw, new_kw) in SCENARIOS.items():
        base = tmp_path_factory.mktemp(name)
        old.save_pretrained(base / "old", **old_kw)
        want_old = _snapshot(base / "old")
        shutil.copytree(base / "old", base / "new")
        new.save_pretrained(base / "new", **new_kw)
        out[name] = (base / "old", new, new_kw, want_old, _snapshot(base / "new"))
    assert len(out["sharded_to_single"][3][3]) > 3, "the old checkpoint should be sharded"
    return out


class _Failure:
    """Replaces `owner.attr` (os.replace, os.unlink, Path.unlink) so that its n-th call raises
    `error`, before doing its work or (after=True) after it, like a Ctrl-C just too late."""

    def __init__(self, monkeypatch, owner, attr, n, error, after):
        real, self.calls, self.fired = getattr(owner, attr), 0, False

        def failing(*a, **k):
            self.calls += 1
            if self.calls != n:
                return real(*a, **k)
            self.fired = True
            if after:
                real(*a, **k)
            raise error("injected failure")
        monkeypatch.setattr(owner, attr, failing)


def _matches(got, want) -> bool:
    config, state, logits, files = got
    w_config, w_state, w_logits, w_files = want
    return config == w_config and files == w_files and torch.equal(logits, w_logits) and \
        state.keys() == w_state.keys() and all(torch.equal(state[k], w_state[k]) for k in state)


OPS = {"os.replace": (os, "replace"), "os.unlink": (os, "unlink")}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("error, after", [(OSError, False), (KeyboardInterrupt, False),
                                          (KeyboardInterrupt, True)])
def test_interrupted_save_reads_old_or_new_never_a_mix(tmp_path, monkeypatch, saved, scenario,
                                                       op, error, after):
    """Fail the n-th call of `op` in save_pretrained, for n = 1, 2, ... until the save goes
    through: every time, the next from_pretrained reads exactly the old checkpoint or exactly
    the new one (config, every tensor, logits, and the files left in the directory)."""
    old_dir, new, new_kw, want_old, want_new = saved[scenario]
    outcomes = []
    for n in range(1, 100):
        d = tmp_path / f"n{n}"
        shutil.copytree(old_dir, d)
        failure = _Failure(monkeypatch, *OPS[op], n, error, after)
        try:
            new.save_pretrained(d, **new_kw)
        except (OSError, KeyboardInterrupt):
            assert failure.fired
        monkeypatch.undo()
        if not failure.fired:                                    # the save went through
            assert _matches(_snapshot(d), want_new)
            break
        journal = d / mamba2._JOURNAL
        if journal.exists():   # readers that know no journal: no stale index shadows new weights
            steps = json.loads(journal.read_text())["steps"]
            done = {s[2] for s in steps if s[0] == "replace" and not (d / s[1]).exists()}
            if done & {"model.safetensors", "pytorch_model.bin"}:
                assert not (d / "model.safetensors.index.json").exists() or \
                    "model.safetensors.index.json" in done
        got = _snapshot(d)
        assert _matches(got, want_old) or _matches(got, want_new), n
        outcomes.append("old" if _matches(got, want_old) else "new")
    else:
        raise AssertionError("the save never went through")
    assert outcomes, "no failure was injected"
    if op == "os.replace" and not after:
        assert outcomes[0] == "old" and outcomes[-1] == "new"   # before and after the commit


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failing_cleanup_after_a_failed_commit_keeps_the_old_checkpoint(tmp_path, monkeypatch,
                                                                        saved, error):
    """The commit (the journal's rename) fails, then so does the n-th removal of a temporary
    file (Path.unlink): the old checkpoint stays what is read, whatever is left behind."""
    old_dir, new, new_kw, want_old, _ = saved["single_to_sharded"]
    for n in range(1, 100):
        d = tmp_path / f"n{n}"
        shutil.copytree(old_dir, d)
        _Failure(monkeypatch, os, "replace", 1, OSError, False)
        cleanup = _Failure(monkeypatch, Path, "unlink", n, error, False)
        with pytest.raises((OSError, KeyboardInterrupt)):
            new.save_pretrained(d, **new_kw)
        monkeypatch.undo()
        config, state, logits, _ = _snapshot(d)
        assert _matches((config, state, logits, want_old[3]), want_old), n
        assert not (d / mamba2._JOURNAL).exists()
        if not cleanup.fired:
            assert sorted(p.name for p in d.iterdir()) == want_old[3]
            break
    assert n > 3


def test_interrupted_save_is_completed_by_the_next_save(tmp_path, monkeypatch, saved):
    old_dir, new, new_kw, _, _ = saved["sharded_to_single"]
    d = tmp_path / "ckpt"
    shutil.copytree(old_dir, d)
    _Failure(monkeypatch, os, "replace", 3, KeyboardInterrupt, False)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(d, **new_kw)
    monkeypatch.undo()
    assert (d / mamba2._JOURNAL).exists()
    third = _model(6)
    third.save_pretrained(d, format="full")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    back = Mamba2LMHeadModel.from_pretrained(d)
    _assert_same_state(third, back)


def test_interrupted_save_in_a_read_only_directory_is_a_clear_error(tmp_path, monkeypatch,
                                                                    saved):
    old_dir, new, new_kw, _, want_new = saved["single_to_sharded"]
    d = tmp_path / "ckpt"
    shutil.copytree(old_dir, d)
    _Failure(monkeypatch, os, "replace", 2, OSError, False)     # the first rename after commit
    with pytest.raises(OSError):
        new.save_pretrained(d, **new_kw)
    monkeypatch.undo()

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(ValueError, match="interrupted save_pretrained.*must be completed"):
        Mamba2LMHeadModel.from_pretrained(d)
    with pytest.raises(ValueError, match="interrupted save_pretrained"):
        mamba2.load_checkpoint_tensors(d)
    monkeypatch.undo()
    assert _matches(_snapshot(d), want_new)
    assert not (d / mamba2._JOURNAL).exists()


def test_done_journal_in_a_read_only_directory_loads(tmp_path, monkeypatch):
    """Every step done, only the journal left (its removal failed): loading needs no writes."""
    model = _model(7)
    _Failure(monkeypatch, os, "unlink", 1, OSError, False)      # the journal's removal
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path, format="full")
    monkeypatch.undo()
    assert (tmp_path / mamba2._JOURNAL).exists()

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "unlink", read_only)
    _assert_same_state(model, Mamba2LMHeadModel.from_pretrained(tmp_path))


@pytest.mark.parametrize("steps", [
    [["remove", "notes.txt"]], [["replace", ".x.1.tmp", "notes.txt"]],
    [["replace", ".model.safetensors.1.tmp", "../model.safetensors"]],
    [["remove", "../model.safetensors"]], [["remove", "/etc/passwd"]], "nonsense"])
def test_a_forged_journal_is_refused_and_touches_nothing(tmp_path, steps):
    _model(8).save_pretrained(tmp_path / "ckpt", format="full")
    d = tmp_path / "ckpt"
    (d / "notes.txt").write_text("mine")
    (d / ".x.1.tmp").write_text("x")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    (d / mamba2._JOURNAL).write_text(json.dumps({"steps": steps}))
    with pytest.raises(ValueError, match="not a valid save_pretrained journal"):
        Mamba2LMHeadModel.from_pretrained(d)
    with pytest.raises(ValueError, match="not a valid save_pretrained journal"):
        _model(9).save_pretrained(d, format="full")
    (d / mamba2._JOURNAL).unlink()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_journal_is_never_fetched_from_the_hub():
    import fnmatch
    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]   # resolve_checkpoint's
    assert not any(fnmatch.fnmatch(mamba2._JOURNAL, p) for p in patterns)


# ============================================================== 3. only weight files are removed

def test_save_removes_only_weight_files_an_index_names(tmp_path):
    d = tmp_path / "ckpt"
    _model(10).save_pretrained(d, format="transformers", max_shard_size=4000)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    outside = tmp_path / "model-00001-of-00009.safetensors"
    outside.write_bytes(b"outside")
    (d / "sub").mkdir()
    mine = {"notes.txt": b"precious", "tokenizer.json": b"{}", "model-v1.safetensors": b"v1",
            "model-00007-of-00009.safetensors": b"a shard no index names",
            "sub/model-00002-of-00009.safetensors": b"in a subfolder"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    names = ["notes.txt", "tokenizer.json", "model-v1.safetensors", str(outside),
             "../model-00001-of-00009.safetensors", "sub/model-00002-of-00009.safetensors",
             "./notes.txt", "sub/../notes.txt", 7, None]
    for i, name in enumerate(names):
        index["weight_map"][f"x{i}"] = name
    index_file.write_text(json.dumps(index))
    model = _model(11)
    model.save_pretrained(d, format="full")
    for name, data in mine.items():
        assert (d / name).read_bytes() == data, name
    assert outside.read_bytes() == b"outside"
    assert not any((d / s).exists() for s in shards)          # the real shards did go
    assert not index_file.exists()
    left = {p.name for p in d.iterdir()} - {Path(n).parts[0] for n in mine}
    assert left == {"config.json", "model.safetensors"}
    _assert_same_state(model, Mamba2LMHeadModel.from_pretrained(d))


def test_weight_file_names():
    ok = ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
          "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors",
          "pytorch_model-00003-of-00010.bin", "model-100000-of-100000.safetensors"]
    bad = ["notes.txt", "tokenizer.json", "config.json", "model-1-of-2.safetensors",
           "model-00001-of-00002.bin", "../model.safetensors", "sub/model.safetensors",
           "/model.safetensors", "model-00001-of-00002.safetensors/x", ".model.safetensors",
           "model.safetensors\n", 3, None]
    assert all(mamba2._is_weight_file_name(n) for n in ok)
    assert not any(mamba2._is_weight_file_name(n) for n in bad)


# ================================================================= 4. directories that cannot be

def test_save_under_a_file_is_a_value_error_naming_the_directory(tmp_path):
    f = tmp_path / "some_file"
    f.write_text("x")
    for target in (f / "sub", f / "sub" / "deeper", f):
        with pytest.raises(ValueError, match="directory '.*some_file.*'") as e:
            _model(12).save_pretrained(target)
        assert "not a directory" in str(e.value) or "is a file" in str(e.value)
    assert f.read_text() == "x" and sorted(tmp_path.iterdir()) == [f]


# =========================================================================================
# ==== 24. more promises: segments through caches, linting, named errors
# =========================================================================================


def test_a_non_causal_attention_layer_refuses_a_cache():
    """attn_cfg causal=False (the official default) makes outputs depend on later tokens: a cache
    cannot continue it, so using one is a named error, not logits that differ from the whole."""
    cfg = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=64, headdim=8, d_state=8,
                              attn_layer_idx=[1], attn_cfg=dict(num_heads=4))
    model = mamba2.Mamba2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (1, 5))
    cache = model.allocate_inference_cache(1)
    before = [t.clone() for c in cache for t in mamba2._cache_tensors(c)]
    with pytest.raises(ValueError, match=r"cache\[1\].*non-causal.*causal'\] = True"):
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="non-causal"):
        model.generate(ids, max_new_tokens=2)
    after = [t for c in cache for t in mamba2._cache_tensors(c)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with torch.no_grad():      # without a cache it runs, bidirectionally: a later token matters
        other = ids.clone()
        other[0, 4] = (ids[0, 4] + 1) % 64
        assert not torch.equal(model(ids)[:, 0], model(other)[:, 0])


def test_the_code_passes_the_linter():
    """Lines <= 100 and the pyflakes rules (ruff.toml), on every Python file of the repo."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent
    files = sorted(str(p.name) for p in repo.glob("*.py"))
    run = subprocess.run([sys.executable, "-m", "ruff", "check", *files], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def _ex_lm(attn=False, seed=0):
    extra = dict(attn_layer_idx=[1], attn_cfg=dict(num_heads=4, num_heads_kv=2, causal=True,
                                                  rotary_emb_dim=4, d_conv=3)) if attn else {}
    torch.manual_seed(seed)
    model = mamba2.Mamba2LMHeadModel(mamba2.Mamba2Config(
        d_model=32, n_layer=3, vocab_size=64, headdim=8, d_state=8, chunk_size=4,
        learnable_init_states=True, **extra), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("attn", [False, True], ids=["mamba", "hybrid"])
@pytest.mark.parametrize("cuts", [[4], [3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [2, 7]],
                         ids=["at a segment start", "inside", "token by token", "two cuts"])
def test_packed_input_fed_through_a_cache_in_pieces_equals_the_whole(attn, cuts):
    """The cache remembers the segment of the last token it saw: a piece whose row starts another
    segment starts that row afresh (learned init state, empty conv window, no earlier keys)."""
    model = _ex_lm(attn)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    seq = torch.tensor([[0] * 4 + [1] * 3 + [2] * 3, [5] * 2 + [6] * 8])
    with torch.no_grad():
        whole = model(ids, seq_idx=seq)
        cache = model.allocate_inference_cache(2)
        bounds = [0] + cuts + [10]
        pieces = [model(ids[:, a:b], seq_idx=seq[:, a:b], cache=cache)
                  for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=1e-12)
    assert all(torch.equal(c.seq_id, seq[:, -1]) for c in cache)
    for c in cache:                                     # reset forgets the segment
        c.reset()
        assert c.seq_id is None


def test_the_functional_scan_refuses_growing_decays():
    """ssd and ssd_step need A <= 0 and dt >= 0 (exp(dt A) <= 1); A_log passed for A is the slip."""
    g = torch.Generator().manual_seed(0)
    x, B, C = (torch.randn(1, 6, 2, 4, generator=g) for _ in range(3))
    B, C = B[..., :1, :], C[..., :1, :]
    dt, A = torch.rand(1, 6, 2, generator=g), -torch.rand(2, generator=g)
    mamba2.ssd(x, dt, A, B, C, chunk_size=4)
    with pytest.raises(ValueError, match=r"A must be <= 0.*A_log"):
        mamba2.ssd(x, dt, -A, B, C, chunk_size=4)
    with pytest.raises(ValueError, match="dt must be >= 0"):
        mamba2.ssd(x, -dt, A, B, C, chunk_size=4)
    state = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="A must be <= 0"):
        mamba2.ssd_step(x[:, 0], dt[:, 0], -A, B[:, 0], C[:, 0], state)
    assert not state.any()


def test_more_mistakes_are_named_errors():
    block = mamba2.Mamba2(mamba2.Mamba2Config(d_model=8, d_state=4, headdim=4))
    u = torch.randn(1, 5, 8)
    with pytest.raises(TypeError, match="return_final_states must be a bool"):
        block(u, return_final_states="yes")
    with pytest.raises(TypeError, match=r"initial_states has dtype torch.float64.*float32"):
        block(u, initial_states=torch.zeros(1, 4, 4, 4, dtype=torch.float64))
    y, S = block(u, return_final_states=True)       # a final state goes back in as it came out
    torch.testing.assert_close(block(u, initial_states=S), block(u, initial_states=S.clone()))
    with pytest.raises(ValueError, match="x must have no empty dimension"):
        mamba2.causal_conv1d(torch.randn(1, 0, 6), torch.randn(6, 4))
    model = mamba2.Mamba2LMHeadModel(mamba2.Mamba2Config(d_model=8, n_layer=1, vocab_size=16,
                                                         d_state=4, headdim=4))
    ids = torch.ones(1, 3, dtype=torch.long)
    for gen, err, match in (("gen", TypeError, "generator must be a torch.Generator"),):
        with pytest.raises(err, match=match):
            model.generate(ids, max_new_tokens=2, do_sample=True, generator=gen)


def test_the_command_line_reports_a_huge_seed():
    import subprocess
    import sys
    from pathlib import Path
    run = subprocess.run([sys.executable, "mamba2.py", "x", "--seed", "9" * 25],
                         cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: --seed must fit in 64 bits")
    assert "Traceback" not in run.stderr


# =========================================================================================
# ==== 25. mutant killers: contracts the library states
# =========================================================================================
# Tests written to kill planted bugs (the mutants of mutants.py) that survived the rest of the
# suite. Each compares mamba2.py against an oracle written here (a formula, transformers' model, an
# independent decoder) or against a contract its documentation states, never against itself.
#
#     python mutants.py            # re-plants every mutant in a copy of the repo and runs the suite

BF16 = torch.bfloat16
INF = math.inf


# ======================================================================================== helpers

def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=_g(seed), dtype=F64) * scale).to(dtype)


def _rel(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.detach().to(F64), expected.detach().to(F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)


@torch.no_grad()
def _shake(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter away from its special initial value, so that a wrong use of any of them
    shows: norms and D around 1, a spread of step sizes (some above any dt_limit), nonzero biases,
    conv taps, learned initial states and O(1) embeddings."""
    gen = _g(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=F64)
        last = name.rsplit(".", 1)[-1]
        if last == "D" or (last == "weight" and "norm" in name):
            p.copy_(1 + 0.4 * noise)
        elif last == "dt_bias":
            p.copy_(torch.rand(p.shape, generator=gen, dtype=F64) * 3.5 - 3.0)
        elif last == "A_log":
            p.add_(0.3 * noise)
        elif last in ("bias", "init_states") or "conv1d" in name:
            p.copy_(0.4 * noise)
        elif "embedding" in name or name.startswith("lm_head"):
            p.copy_(0.3 * noise)
    return model


def _mu_lm(seed=0, dtype=F64, **kw) -> Mamba2LMHeadModel:
    """A small LM, float64 throughout by default: residual_in_fp32=True would round the residual
    stream of a float64 model to fp32 (as official mamba_ssm does), capping comparisons at 1e-7."""
    base = dict(d_model=16, n_layer=2, d_state=4, headdim=8, chunk_size=4, vocab_size=37,
                pad_vocab_size_multiple=16, residual_in_fp32=False)
    torch.manual_seed(seed)
    return _shake(Mamba2LMHeadModel(Mamba2Config(**{**base, **kw}), dtype=dtype), seed).eval()


def _ids(b, l, vocab=37, seed=0):
    return torch.randint(0, vocab, (b, l), generator=_g(seed))


def _config_diff(a: Mamba2Config, b: Mamba2Config) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)}


# ============================================== 1. the fused loss scales with the incoming gradient

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_loss_gradients_scale_with_the_incoming_gradient(tie):
    """forward(labels=) under (loss * c).backward(), gradient accumulation over a retained graph and
    explicit grad_outputs: every parameter's gradient is c times that of F.cross_entropy on the
    logits (float64). A backward that ignores its incoming gradient passes only c = 1."""
    model = _mu_lm(seed=1, tie_embeddings=tie)
    ids = _ids(2, 9, seed=2)
    labels = ids.clone()
    labels[0, 4], labels[1, :3] = -100, -100
    params = list(model.parameters())
    logits = model(ids)[..., :37]
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want = torch.autograd.grad(ref, params)
    errors = []
    for c in (0.25, 3.0, -1.5):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels)
        assert _rel(loss, ref) <= 1e-13
        (loss * c).backward()
        errors += [_rel(p.grad, c * w) for p, w in zip(params, want)]
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    (loss / 4).backward(retain_graph=True)          # accumulated: 1/4 + 3/4 of the gradient
    (loss * 0.75).backward()
    errors += [_rel(p.grad, w) for p, w in zip(params, want)]
    loss = model(ids, labels=labels)
    got = torch.autograd.grad(2 * loss + loss / 2, params)           # two uses of one loss
    errors += [_rel(a, 2.5 * w) for a, w in zip(got, want)]
    got = torch.autograd.grad(model(ids, labels=labels), params,
                              grad_outputs=torch.tensor(-0.5, dtype=F64))
    errors += [_rel(a, -0.5 * w) for a, w in zip(got, want)]
    assert max(errors) <= 1e-11, max(errors)


# =============================================================== 2. GatedMLP and the residual block

@pytest.mark.parametrize("d_intermediate, multiple_of, hidden",
                         [(40, 128, 128), (40, 16, 48), (130, 128, 256)])
def test_gated_mlp_is_fc2_of_value_times_silu_of_gate(d_intermediate, multiple_of, hidden):
    """Official GatedMLP: fc1's output chunked into (y, gate) in that order, fc2(y * silu(gate)),
    hidden = d_intermediate rounded up to multiple_of, no biases; the formula written out here."""
    torch.manual_seed(3)
    mlp = GatedMLP(24, d_intermediate, multiple_of=multiple_of, dtype=F64)
    assert mlp.fc1.weight.shape == (2 * hidden, 24) and mlp.fc2.weight.shape == (24, hidden)
    assert mlp.fc1.bias is None and mlp.fc2.bias is None
    x = _randn(3, 5, 24, seed=4)
    w1, w2 = mlp.fc1.weight.detach(), mlp.fc2.weight.detach()
    y, gate = x @ w1[:hidden].T, x @ w1[hidden:].T
    want = (y * gate / (1 + torch.exp(-gate))) @ w2.T
    with torch.no_grad():
        assert _rel(mlp(x), want) <= 1e-13


def _norm_ref(module, x, rms: bool, eps: float):
    w = module.weight.detach()
    if rms:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + module.bias.detach()


@pytest.mark.parametrize("rms_norm", [True, False], ids=["rmsnorm", "layernorm"])
def test_lm_is_prenorm_residual_with_the_mlp_after_norm2(rms_norm):
    """Official Block order, written out (each mixer taken as it is): residual += hidden; hidden =
    mixer(norm(residual)); residual += hidden; hidden = mlp(norm2(residual)); then norm_f of the
    last sum and the head. The MLP is the formula of the test above; the residual norms take
    norm_epsilon (0.01 here, so that it shows)."""
    eps = 0.01
    model = _mu_lm(seed=5, d_intermediate=40, rms_norm=rms_norm, n_layer=3, tie_embeddings=False,
                norm_epsilon=eps)
    ids = _ids(2, 7, seed=6)
    with torch.no_grad():
        hidden, residual = model.backbone.embedding.weight[ids], None
        for layer in model.backbone.layers:
            residual = hidden if residual is None else hidden + residual
            hidden = layer.mixer(_norm_ref(layer.norm, residual, rms_norm, eps))
            residual = hidden + residual
            x = _norm_ref(layer.norm2, residual, rms_norm, eps)
            w1, w2 = layer.mlp.fc1.weight, layer.mlp.fc2.weight
            y, gate = (x @ w1.T).chunk(2, -1)
            hidden = (y * F.silu(gate)) @ w2.T
        head = model.lm_head.weight
        want = _norm_ref(model.backbone.norm_f, hidden + residual, rms_norm, eps) @ head.T
        assert _rel(model(ids), want) <= 1e-12


# =================================== 3. save_pretrained -> from_pretrained keeps every config field

# official MHA options and defaults (mamba_ssm.modules.mha.MHA), which attn_cfg holds
_MHA_DEFAULTS = dict(num_heads=None, num_heads_kv=None, head_dim=None, mlp_dim=0,
                     qkv_proj_bias=True, out_proj_bias=True, softmax_scale=None, causal=False,
                     d_conv=0, rotary_emb_dim=0, rotary_emb_base=10000.0,
                     rotary_emb_interleaved=False)


_SEED = 0


def _random_config(rng: random.Random, flavour: str) -> Mamba2Config:
    """A valid Mamba2Config with most fields away from their defaults. flavour "transformers":
    only what transformers' Mamba2 expresses; "official": what mamba_ssm's config expresses;
    "any": anything (hybrid attention layers included)."""
    coin = rng.random
    d_model = rng.choice([8, 12, 16])
    expand = rng.choice([1, 2, 3])
    headdim = rng.choice([2, 4])
    all_heads = expand * d_model // headdim
    d_ssm = None
    if flavour != "transformers" and coin() < 0.5:
        d_ssm = headdim * rng.randrange(1, all_heads)
    nheads = (d_ssm or expand * d_model) // headdim
    n_layer = rng.randint(1, 3)
    low = round(rng.uniform(0.5, 3.0), 3)
    kw = dict(
        d_model=d_model, d_state=rng.choice([2, 3, 5]), d_conv=rng.choice([2, 3, 5]),
        conv_init=rng.choice([None, 0.3, 0.05]), expand=expand, headdim=headdim, d_ssm=d_ssm,
        ngroups=rng.choice([g for g in (1, 2, 3, 4) if nheads % g == 0]),
        A_init_range=(low, low + round(rng.uniform(0.5, 6.0), 3)), D_has_hdim=coin() < 0.5,
        rmsnorm=coin() < 0.7, norm_before_gate=coin() < 0.5,
        dt_min=round(rng.uniform(1e-4, 5e-3), 6), dt_max=round(rng.uniform(0.02, 0.3), 4),
        dt_init_floor=rng.choice([0.0, 2e-4, 1e-3]),
        dt_limit=rng.choice([(0.0, INF), (0.0, 0.05), (0.002, 0.3), (0.01, INF)]),
        bias=coin() < 0.5, conv_bias=coin() < 0.5, chunk_size=rng.choice([1, 3, 4, 7]),
        use_mem_eff_path=coin() < 0.5, learnable_init_states=coin() < 0.5, n_layer=n_layer,
        d_intermediate=rng.choice([0, 20, 40]), vocab_size=rng.choice([29, 37, 48, 50]),
        pad_vocab_size_multiple=rng.choice([1, 8, 16]), tie_embeddings=coin() < 0.5,
        residual_in_fp32=coin() < 0.5, norm_epsilon=rng.choice([1e-5, 1e-6, 3e-4]),
        rms_norm=coin() < 0.6)
    if flavour == "transformers":
        kw.update(D_has_hdim=False, rmsnorm=True, norm_before_gate=False, rms_norm=True,
                  d_intermediate=0, learnable_init_states=False, norm_epsilon=1e-5)
    elif flavour == "official":
        kw.update(learnable_init_states=False, norm_epsilon=1e-5)
    if flavour == "any":
        heads = rng.choice([h for h in (1, 2, 4) if d_model % h == 0])
        head_dim = rng.choice([None, 4, 6])
        hd = head_dim or d_model // heads
        kw["attn_layer_idx"] = sorted(rng.sample(range(n_layer), rng.randint(1, n_layer)))
        kw["attn_cfg"] = dict(
            num_heads=heads,
            num_heads_kv=rng.choice([None] + [k for k in (1, 2) if heads % k == 0]),
            head_dim=head_dim, mlp_dim=rng.choice([0, 16, 40]), qkv_proj_bias=coin() < 0.5,
            out_proj_bias=coin() < 0.5, softmax_scale=rng.choice([None, 0.37]),
            causal=coin() < 0.5, d_conv=rng.choice([0, 3]),
            rotary_emb_dim=rng.choice([0, 2, hd - hd % 2]),
            rotary_emb_base=rng.choice([10000.0, 500.0]), rotary_emb_interleaved=coin() < 0.5)
    return Mamba2Config(**kw)


# seeded, so that the coverage test below holds (it names what a new field would need)
_ROUND_TRIP_CONFIGS = [_random_config(random.Random(_SEED + i), flavour) for i, flavour in
                       enumerate(["transformers", "transformers", "official", "official",
                                  "any", "any", "any", "any", "any"])]


def _transformers_can_express(c: Mamba2Config) -> bool:
    """transformers' Mamba2: no MLP branch, always the gated norm with the gate before it, D per
    head, RMSNorm residual norms sharing one eps, no GatedMLP, no attention, no learned states."""
    return (c.d_ssm == c.d_inner and c.rmsnorm and not c.norm_before_gate and not c.D_has_hdim
            and c.rms_norm and c.d_intermediate == 0 and not c.attn_layer_idx
            and not c.learnable_init_states and c.norm_epsilon == 1e-5)


def test_round_trip_configs_cover_every_config_field_and_attention_option():
    """The property below is only as good as its configs: each Mamba2Config field (and each
    official MHA option in attn_cfg) takes a non-default value in at least one of them, and each
    format is exercised both writing and refusing."""
    for f in dataclasses.fields(Mamba2Config):
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        values = [getattr(c, f.name) for c in _ROUND_TRIP_CONFIGS]
        if f.name == "d_ssm":                                   # None means d_inner
            assert any(c.d_ssm != c.d_inner for c in _ROUND_TRIP_CONFIGS)
            continue
        assert any(v != default for v in values), f"no config sets {f.name}: extend the generator"
        assert len({repr(v) for v in values}) > 1 or f.name == "d_model", f.name
    assert set(_MHA_DEFAULTS) == set(mamba2._ATTENTION_DEFAULTS)
    for key, default in _MHA_DEFAULTS.items():
        assert any(c.attn_layer_idx and c.attn_cfg.get(key, default) != default
                   for c in _ROUND_TRIP_CONFIGS), f"no hybrid config sets attn_cfg[{key!r}]"
    assert any(_transformers_can_express(c) for c in _ROUND_TRIP_CONFIGS)
    assert any(not _transformers_can_express(c) for c in _ROUND_TRIP_CONFIGS)
    assert any(c.learnable_init_states for c in _ROUND_TRIP_CONFIGS)


@pytest.mark.parametrize("fmt", ["mamba_ssm", "transformers", "full"])
@pytest.mark.parametrize("index", range(len(_ROUND_TRIP_CONFIGS)))
def test_save_pretrained_round_trip_keeps_every_config_field(tmp_path, index, fmt):
    """save_pretrained(format) -> from_pretrained gives back the same config, field for field, the
    same tensors and bit-identical logits — or, for a config the format cannot express, a clear
    ValueError before anything is written. Documented exceptions: the transformers format folds
    the vocabulary padding into vocab_size and has no keys for the init-only conv_init and
    A_init_range nor for use_mem_eff_path (they return to their defaults); the official mamba_ssm
    format has no learnable_init_states nor norm_epsilon."""
    cfg = _ROUND_TRIP_CONFIGS[index]
    torch.manual_seed(index)
    model = _shake(Mamba2LMHeadModel(cfg, dtype=F64), seed=100 + index).eval()
    ids = _ids(2, 11, vocab=cfg.vocab_size, seed=index)
    d = tmp_path / "ckpt"
    refused = {"transformers": not _transformers_can_express(cfg),
               "mamba_ssm": cfg.learnable_init_states or cfg.norm_epsilon != 1e-5,
               "full": False}[fmt]
    if refused:
        what = "transformers' Mamba2 cannot express" if fmt == "transformers" else "mamba_ssm"
        with pytest.raises(ValueError, match=what):
            model.save_pretrained(d, format=fmt)
        assert not d.exists() or not any(d.iterdir())
        return
    model.save_pretrained(d, format=fmt)
    loaded = Mamba2LMHeadModel.from_pretrained(d)
    want = cfg
    if fmt == "transformers":
        lost = {f.name: f.default for f in dataclasses.fields(Mamba2Config)
                if f.name in ("conv_init", "A_init_range", "use_mem_eff_path")}
        want = dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size, pad_vocab_size_multiple=1,
                                   **lost)
    assert not _config_diff(loaded.config, want), _config_diff(loaded.config, want)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ====================================================== 4. every command-line flag reaches generate

def _record_generate(monkeypatch) -> list:
    """Replace Mamba2LMHeadModel.generate by a recorder: each call's arguments, bound to the real
    signature (so positional and keyword passing read the same), plus the model's dtype and
    device; it returns the prompt, as a generation of no tokens."""
    calls, real = [], Mamba2LMHeadModel.generate

    def fake(self, *args, **kwargs):
        bound = inspect.signature(real).bind(self, *args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments, model_dtype=self.dtype, model_device=self.device))
        return bound.arguments["input_ids"]

    monkeypatch.setattr(Mamba2LMHeadModel, "generate", fake)
    return calls


@pytest.fixture(scope="module")
def shipped_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(mamba2.DEFAULT_MODEL)


@pytest.mark.parametrize("flags, want", [
    (["--max-new-tokens", "7", "--temperature", "0.55", "--top-k", "13", "--top-p", "0.66",
      "--min-p", "0.07", "--repetition-penalty", "1.3", "--seed", "1234", "--dtype", "bfloat16"],
     dict(max_new_tokens=7, temperature=0.55, top_k=13, top_p=0.66, min_p=0.07,
          repetition_penalty=1.3, do_sample=True, seed=1234, model_dtype=BF16)),
    (["--temperature", "0", "--top-k", "2", "--seed", "5", "--dtype", "float16"],
     dict(temperature=0.0, top_k=2, do_sample=False, seed=5, model_dtype=torch.float16)),
    ([], dict(max_new_tokens=100, temperature=0.7, top_k=0, top_p=0.9, min_p=0.0,
              repetition_penalty=1.1, do_sample=True, seed=0, model_dtype=torch.float32)),
], ids=["every_flag", "greedy", "defaults"])
def test_command_line_flags_reach_generate(monkeypatch, capsys, shipped_tokenizer, flags, want):
    """`python mamba2.py PROMPT --flags` (main in process): generate receives each sampling flag,
    a generator seeded with --seed, the tokenizer's eos id, a TextStreamer, the tokenized prompt,
    and a model in --dtype on --device. The defaults are the documented ones (README)."""
    calls = _record_generate(monkeypatch)
    prompt = "def héllo(n):"
    mamba2.main([prompt, "--device", "cpu"] + flags)
    assert len(calls) == 1
    got = calls[0]
    for key, value in want.items():
        if key == "seed":
            assert got["generator"].initial_seed() == value
        else:
            assert got[key] == value, (key, got[key], value)
    assert got["model_device"] == torch.device("cpu")
    assert got["eos_token_id"] == shipped_tokenizer.eos_token_id
    assert isinstance(got["streamer"], TextStreamer)
    assert got["input_ids"].tolist() == [shipped_tokenizer(prompt).input_ids]
    assert "tokens/s" in capsys.readouterr().out


def _command_line_text(capsys, *flags) -> str:
    mamba2.main(["def fibonacci(n):", "--max-new-tokens", "12", "--device", "cpu", *flags])
    out = capsys.readouterr().out
    text, stats = out.rstrip("\n").rsplit("\n", 1)
    assert stats.startswith("[12 tokens in"), stats
    return text


def test_command_line_degenerate_sampling_flags_give_the_greedy_text(capsys, shipped_tokenizer):
    """On the shipped model, sampling at temperature 0.7 with --top-k 1, --top-p 1e-6 or --min-p 1
    prints what --temperature 0 (greedy) prints, which is greedy decoding with the repetition
    penalty 1.1 done here; plain sampling prints something else."""
    greedy = _command_line_text(capsys, "--temperature", "0")
    model = Mamba2LMHeadModel.from_pretrained(mamba2.DEFAULT_MODEL)
    ids = shipped_tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, repetition_penalty=1.1)
    assert greedy == shipped_tokenizer.decode(out[0], skip_special_tokens=True)
    for flags in (["--top-k", "1"], ["--top-p", "1e-6"], ["--min-p", "1"]):
        assert _command_line_text(capsys, "--temperature", "0.7", "--seed", "3", *flags) == greedy
    sampled = [_command_line_text(capsys, "--temperature", "1.5", "--top-p", "1", "--seed", s)
               for s in ("1", "2")]
    assert sampled[0] != sampled[1] and greedy not in sampled


# ============================================================ 5. the dtype contracts the docs state

@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_scan_runs_in_fp32_for_low_precision_input(dtype):
    """ssd's docstring: y in x's dtype, the final state in fp32, the scan in fp32 — so y is the
    fp32 scan of the same (low-precision) values rounded once, bit for bit."""
    b, l, h, p, g, n = 2, 11, 4, 3, 2, 5
    x, B, C = _randn(b, l, h, p, seed=1), _randn(b, l, g, n, seed=2), _randn(b, l, g, n, seed=3)
    dt = torch.rand(b, l, h, generator=_g(4), dtype=F64) * 0.5 + 0.05
    A, D, S = -torch.rand(h, generator=_g(5), dtype=F64) - 0.5, _randn(h, seed=6), \
        _randn(b, h, p, n, seed=7)
    low = [t.to(dtype) for t in (x, dt, A, B, C)]
    y, final = ssd(*low, 4, D=D.to(dtype), initial_states=S.to(dtype), return_final_states=True)
    assert y.dtype == dtype and final.dtype == torch.float32
    y32, final32 = ssd(*[t.float() for t in low], 4, D=D.to(dtype).float(),
                       initial_states=S.to(dtype).float(), return_final_states=True)
    assert torch.equal(y, y32.to(dtype)) and torch.equal(final, final32)
    y64, final64 = ssd(x, dt, A, B, C, 4, D=D, initial_states=S, return_final_states=True)
    assert y64.dtype == final64.dtype == F64


def test_gated_norm_and_dt_statistics_in_fp32_output_in_input_dtype():
    """rms_norm_gated: statistics in fp32, output in x's dtype (= the fp32 result rounded once);
    discretize_dt: dt in fp32 for bf16 input."""
    x, z, w = _randn(3, 12, seed=8, dtype=BF16), _randn(3, 12, seed=9, dtype=BF16), \
        _randn(12, seed=10, dtype=BF16)
    for nbg in (False, True):
        out = rms_norm_gated(x, z, w, group_size=4, norm_before_gate=nbg)
        want = rms_norm_gated(x.float(), z.float(), w.float(), group_size=4, norm_before_gate=nbg)
        assert out.dtype == BF16 and torch.equal(out, want.to(BF16))
    dt = mamba2.discretize_dt(x[:, :4], w[:4], (0.0, 0.5))
    assert dt.dtype == torch.float32
    assert torch.equal(dt, F.softplus(x[:, :4].float() + w[:4].float()).clamp(max=0.5))


def test_bf16_layer_keeps_D_A_and_final_states_in_fp32():
    """Official Mamba2 in bf16: D is created in the default dtype (fp32), A = -exp(A_log.float())
    in fp32; outputs in the input dtype; final states fp32 (Mamba2.forward's docstring)."""
    torch.manual_seed(11)
    layer = Mamba2(Mamba2Config(d_model=16, d_state=4, headdim=8, chunk_size=4,
                                D_has_hdim=True), dtype=BF16)
    assert layer.D.dtype == torch.float32 and layer.in_proj.weight.dtype == BF16
    assert layer.weights().A.dtype == torch.float32
    u = _randn(2, 6, 16, seed=12, dtype=BF16)
    y, final = layer(u, return_final_states=True)
    assert y.dtype == BF16 and final.dtype == torch.float32
    cache = layer.allocate_inference_cache(2)
    y, final = layer(u, cache=cache, return_final_states=True)
    assert y.dtype == BF16 and final.dtype == torch.float32


def test_bf16_layer_final_state_of_a_cached_step_is_fp32():
    """A one-token cached call's final state is fp32 too, like a longer call's (it once came back
    in the cache's dtype, bf16)."""
    torch.manual_seed(11)
    layer = Mamba2(Mamba2Config(d_model=16, d_state=4, headdim=8, chunk_size=4), dtype=BF16)
    cache = layer.allocate_inference_cache(2)
    _, final = layer(_randn(2, 1, 16, seed=13, dtype=BF16), cache=cache, return_final_states=True)
    assert final.dtype == torch.float32


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_residual_stream_dtype_in_a_bf16_model(residual_in_fp32):
    """residual_in_fp32=True keeps the residual stream of a bf16 model in fp32 (official Block:
    residual.to(torch.float32)), False keeps it in bf16; the logits are bf16 either way, and a
    bf16 checkpoint loads with D in fp32."""
    model = _mu_lm(seed=14, dtype=BF16, residual_in_fp32=residual_in_fp32, d_intermediate=20)
    seen = []
    for layer in model.backbone.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[1].dtype))
    with torch.no_grad():
        logits = model(_ids(2, 5, seed=15))
    assert logits.dtype == BF16
    assert seen == [torch.float32 if residual_in_fp32 else BF16] * 2
    assert all(layer.mixer.D.dtype == torch.float32 for layer in model.backbone.layers)


def test_bf16_checkpoint_loads_in_its_dtype_with_D_in_fp32(tmp_path):
    """from_pretrained without dtype: the dtype most weights have (bf16 here), D in fp32 as the
    official block creates it; dtype='float32' converts everything."""
    model = _mu_lm(seed=16, dtype=BF16)
    model.save_pretrained(tmp_path)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.dtype == BF16 and loaded.backbone.layers[0].mixer.D.dtype == torch.float32
    assert loaded.backbone.layers[0].mixer.in_proj.weight.dtype == BF16
    as32 = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype="float32")
    assert {p.dtype for p in as32.parameters()} == {torch.float32}


def test_bf16_model_round_trip_is_exact(tmp_path):
    """save_pretrained promises a checkpoint from_pretrained reads back exactly: a bf16 model's fp32
    D must not come back rounded through bf16 (an earlier from_pretrained converted every tensor to
    the majority dtype first), and the logits are bit-identical."""
    model = _mu_lm(seed=16, dtype=BF16)
    model.save_pretrained(tmp_path)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.backbone.layers[0].mixer.D, model.backbone.layers[0].mixer.D)
    ids = _ids(2, 6, seed=17)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ========================================================================= 6. the LM's initial draw

def test_lm_init_rescales_residual_out_weights_by_sqrt_n_layer():
    """Official _init_weights (rescale_prenorm_residual, applied last with n_residuals_per_layer=1):
    out_proj.weight and fc2.weight re-drawn kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), then divided by sqrt(n_layer); other Linear weights keep that draw unscaled;
    Linear biases zero; embeddings N(0, 0.02). Checked on a 16-layer LM (with an MLP and an
    attention layer) against a fresh unrescaled draw of the same shape: the standard deviations
    over the 16 layers (~130k draws each) agree with the rule to 3% (the sampling error is ~0.3%),
    and the largest |w| lies just under the rescaled bound."""
    n_layer = 16
    torch.manual_seed(18)
    cfg = Mamba2Config(d_model=64, n_layer=n_layer, d_state=8, headdim=16, d_intermediate=64,
                       vocab_size=500, bias=True, attn_layer_idx=[5],
                       attn_cfg=dict(num_heads=4, mlp_dim=64))
    for cls in (Mamba2LMHeadModel, Mamba2ForSequenceClassification):
        model = cls(cfg)
        groups = {}
        for name, p in model.named_parameters():
            kind = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
            groups.setdefault(kind, []).append(p.detach())
        for kind, scale in (("out_proj.weight", n_layer ** -0.5), ("fc2.weight", n_layer ** -0.5),
                            ("in_proj.weight", 1.0), ("fc1.weight", 1.0)):
            ws = groups[kind]
            fan_in = ws[0].shape[1]
            fresh = torch.empty(len(ws), *ws[0].shape)
            for f in fresh:
                torch.nn.init.kaiming_uniform_(f, a=math.sqrt(5))
            got = torch.cat([w.flatten() for w in ws if w.shape[1] == fan_in])
            ratio = got.std().item() / fresh.std().item()
            assert abs(ratio / scale - 1) < 0.03, (cls.__name__, kind, ratio, scale)
            bound = scale / math.sqrt(fan_in)
            assert bound * 0.97 < got.abs().max().item() <= bound * (1 + 1e-6), (kind, bound)
        for kind in ("in_proj.bias", "out_proj.bias"):
            assert all(not b.any() for b in groups[kind]), kind
        emb = model.backbone.embedding.weight.detach()
        assert abs(emb.std().item() / 0.02 - 1) < 0.03 and abs(emb.mean().item()) < 1e-3


# =============================================== 7. transformers' config keys and Mamba2ForCausalLM

try:
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM
    from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2
except Exception:  # pragma: no cover - transformers is in requirements.txt
    hf_mamba2 = None
needs_transformers = pytest.mark.skipif(hf_mamba2 is None, reason="transformers not installed")


# every key the transformers loader reads, each away from transformers' default
_HF_KEYS = dict(hidden_size=16, num_hidden_layers=3, state_size=6, head_dim=4, num_heads=12,
                n_groups=3, expand=3, conv_kernel=3, chunk_size=5, time_step_limit=[0.0, 0.05],
                use_bias=True, use_conv_bias=False, residual_in_fp32=False,
                tie_word_embeddings=True, layer_norm_epsilon=1e-5, vocab_size=40,
                time_step_min=0.002, time_step_max=0.2, time_step_floor=3e-4, hidden_act="silu")
# ... and the Mamba2Config they mean, written out by hand
_HF_MEANS = dict(d_model=16, n_layer=3, d_state=6, headdim=4, ngroups=3, expand=3, d_conv=3,
                 chunk_size=5, dt_limit=(0.0, 0.05), bias=True, conv_bias=False,
                 residual_in_fp32=False, tie_embeddings=True, norm_epsilon=1e-5, vocab_size=40,
                 dt_min=0.002, dt_max=0.2, dt_init_floor=3e-4, pad_vocab_size_multiple=1,
                 norm_before_gate=False)


def _hf_model(keys: dict, seed: int):
    torch.manual_seed(seed)
    hf = Mamba2ForCausalLM(HFConfig(**keys)).to(F64).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("dt_bias"):            # many step sizes above the 0.05 limit
                p.copy_(torch.rand(p.shape, generator=_g(seed), dtype=F64) * 3 - 2.5)
            elif name.endswith(".D") or name.endswith("norm.weight"):
                p.copy_(1 + 0.4 * torch.randn(p.shape, generator=_g(seed + 1), dtype=F64))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=_g(seed + 2), dtype=F64))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=_g(seed + 3), dtype=F64))
    return hf


@needs_transformers
def test_transformers_config_keys_each_reach_the_config_and_logits(tmp_path, monkeypatch):
    """A config.json with every key _config_from_transformers maps, each non-default
    (time_step_limit (0, 0.05) among them), and safetensors weights of a random float64
    Mamba2ForCausalLM built from it: from_pretrained gives the config meant, field for field, and
    the logits of transformers' model (run in float64) to 1e-12; a non-default layer_norm_epsilon
    (which transformers would use in the blocks' gated norms too) is refused by name."""
    hf = _hf_model(_HF_KEYS, seed=19)
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2", **_HF_KEYS}))
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path)
    want = Mamba2Config(**_HF_MEANS)
    assert not _config_diff(ours.config, want), _config_diff(ours.config, want)
    ids = _ids(2, 13, vocab=40, seed=20)
    with torch.no_grad(), hf_oracle_in_float64(monkeypatch):
        expected = hf(ids).logits
    with torch.no_grad():
        got = ours(ids)
    assert got.dtype == F64 and _rel(got, expected) <= 1e-12, _rel(got, expected)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mamba2", **_HF_KEYS, "layer_norm_epsilon": 1e-6}))
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


@needs_transformers
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_format_loads_in_transformers(tmp_path, monkeypatch, tie):
    """save_pretrained(format="transformers") is read by transformers' Mamba2ForCausalLM
    .from_pretrained: the same config meaning (its vocabulary the padded one) and the same logits
    in float64 (1e-12), dt_limit, groups, biases and the embedding key included."""
    model = _mu_lm(seed=21, d_model=16, headdim=4, ngroups=2, d_conv=3, chunk_size=5, bias=True,
                conv_bias=False, dt_limit=(0.0, 0.05), tie_embeddings=tie, n_layer=2)
    model.save_pretrained(tmp_path, format="transformers")
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path, dtype=F64).eval()
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.state_size, c.head_dim, c.num_heads,
            c.n_groups, c.conv_kernel, c.chunk_size, c.use_bias, c.use_conv_bias,
            c.tie_word_embeddings, c.vocab_size) == (16, 2, 4, 4, 8, 2, 3, 5, True, False, tie, 48)
    assert tuple(c.time_step_limit) == (0.0, 0.05)
    ids = _ids(2, 12, seed=22)
    with torch.no_grad(), hf_oracle_in_float64(monkeypatch):
        expected = hf(ids).logits
    with torch.no_grad():
        got = model(ids)
    assert _rel(got, expected) <= 1e-12, _rel(got, expected)


# ==================================================== 8. streaming never prints a partial character

class _Writes(io.StringIO):
    """A text stream that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


class _ByteTokenizer:
    """An independent byte-level tokenizer: token i is the byte string vocab[i]; decode joins the
    bytes and decodes them as UTF-8, a broken sequence as U+FFFD (what byte-level BPE does)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


_TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🎉🐍 end", "mixed é日🎉x", "ascii only"]


def _stream(tokenizer, prompt, new, before_end=None) -> list:
    """What TextStreamer writes, piece by piece, fed as generate feeds it; before_end (a list)
    receives what was written before end()."""
    out = _Writes()
    streamer = TextStreamer(tokenizer, file=out)
    streamer.put(torch.tensor([prompt]))                    # as generate: the prompt (1, l) ...
    for t in new:
        streamer.put(torch.tensor([t]))                     # ... then one (1,) tensor per token
    if before_end is not None:
        before_end.extend(out.pieces)
    streamer.end()
    return out.pieces


@pytest.mark.parametrize("seed", range(4))
def test_text_streamer_never_prints_a_partial_character(seed):
    """Random cuts of UTF-8 text into byte tokens (cuts inside characters, tokens that end one
    character and start the next): every piece the streamer writes is whole characters (no U+FFFD,
    each one a prefix-extension of the text), and together they are the text plus a newline."""
    rng = random.Random(seed)
    for text in _TEXTS:
        data = text.encode("utf-8")
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, len(data) - 1)))
        tokens = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        tok = _ByteTokenizer(tokens)
        ids = list(range(len(tokens)))
        split = rng.randint(1, len(ids))
        pieces = _stream(tok, ids[:split], ids[split:])
        assert "".join(pieces) == text + "\n"
        assert not any("\ufffd" in p for p in pieces), pieces


def test_text_streamer_with_the_shipped_byte_level_tokenizer(shipped_tokenizer):
    """The shipped tokenizer is byte-level BPE: 'é', '日本' and '🎉' come out as several tokens,
    and streaming them token by token prints no U+FFFD and exactly the decoded text; a genuinely
    broken byte sequence at the very end is printed (as U+FFFD) only by end()."""
    for text in ("héllo", "日本", "🎉 ok", "x = 'ü'"):
        ids = shipped_tokenizer(text).input_ids
        assert shipped_tokenizer.decode(ids) == text
        if text != "x = 'ü'":
            assert any("\ufffd" in shipped_tokenizer.decode(ids[:k]) for k in range(1, len(ids)))
        for split in range(1, len(ids) + 1):
            pieces = _stream(shipped_tokenizer, ids[:split], ids[split:])
            assert "".join(pieces) == text + "\n" and not any("\ufffd" in p for p in pieces)
    ids = shipped_tokenizer("ab日").input_ids
    assert shipped_tokenizer.decode(ids[:1]) == "ab" and len(ids) == 4
    early = []
    pieces = _stream(shipped_tokenizer, ids[:1], ids[1:-1], early)           # '日' cut short
    assert "".join(pieces) == "ab\ufffd\n" and "".join(early) == "ab"


# ============================================================================ 9. more of generation

def test_top_p_boundary_follows_the_transformers_rule():
    """Top-p as transformers' TopPLogitsWarper: sorted ascending, a token is removed when the
    cumulative probability up to it is <= 1 - top_p. With four equal logits every cumulative sum is
    exact in binary (1/4, 1/2, 3/4, 1), so the boundary itself is tested: top_p 0.5 keeps 2
    tokens, 0.25 keeps 1, 0.75 keeps 3, 0.6 keeps 3."""
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = torch.zeros(3, 4)
    for top_p, kept in ((0.25, 1), (0.5, 2), (0.75, 3), (0.6, 3), (1.0, 4)):
        out = mamba2.process_logits(logits.clone(), do_sample=True, top_p=top_p)
        assert torch.isfinite(out).sum(-1).tolist() == [kept] * 3, top_p
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
            assert torch.equal(torch.isfinite(out), torch.isfinite(want)), top_p


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, temperature=1.3),
                                dict(do_sample=True, top_k=3), dict(repetition_penalty=1.2)],
                         ids=["greedy", "sample", "top_k", "penalty"])
def test_generate_never_emits_the_vocabulary_padding(kw):
    """forward's docstring: the vocabulary padding is never sampled by generate. The head's padding
    rows are made to give by far the largest logits; still every generated id is < vocab_size."""
    model = _mu_lm(seed=23, tie_embeddings=False)                   # 37 real tokens, 48 rows
    with torch.no_grad():
        model.lm_head.weight[37:] = 30 * torch.randn(11, 16, generator=_g(24), dtype=F64)
        ids = _ids(3, 5, seed=25)
        logits = model(ids)
        assert (logits[..., 37:].amax(-1) > logits[..., :37].amax(-1) + 5).all()
    out = model.generate(ids, max_new_tokens=8, generator=_g(26), **kw)
    assert out.shape == (3, 13) and int(out[:, 5:].max()) < 37


def test_finished_rows_are_padded_with_the_first_eos_by_default():
    """transformers' default pad_token_id is the first eos id: a row that has emitted any eos of
    the list goes on with eos_token_id[0] while the others go on generating, as the first-eos rule
    applied to the free (eos-less) greedy run gives; all rows done, generation stops."""
    model = _mu_lm(seed=27)
    ids = _ids(4, 3, seed=28)
    free = model.generate(ids, max_new_tokens=6)[:, 3:].tolist()
    # eos: row 1's first token, and another row's first token (a second, different eos id)
    eos = [free[1][0], next(r[0] for r in free if r[0] != free[1][0])]
    pad = eos[0]
    want, ends = [], []
    for row in free:
        done, out = False, []
        for t in row:
            out.append(pad if done else t)
            done = done or t in eos
        want.append(out)
        ends.append(next((k for k, t in enumerate(row) if t in eos), len(row)))
    steps = max(ends) + 1                                # generation stops when all have finished
    assert pad != 0 and min(ends) == 0 and steps > 1     # the case is one that can tell
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos)[:, 3:].tolist()
    assert out == [r[:steps] for r in want]


# ==================================================================== 10. attention's softmax_scale

@pytest.mark.parametrize("scale", [None, 0.3, 2.0])
def test_attention_uses_the_configured_softmax_scale(scale):
    """Official MHA: softmax(q kᵀ · softmax_scale) v, softmax_scale = attn_cfg's, None meaning
    1/sqrt(head_dim). Written out for a causal layer with one kv head shared by two query heads
    (no conv, no rotary, no MLP), the scale taken from the config, not from the layer."""
    cfg = Mamba2Config(d_model=16, n_layer=1, d_state=4, headdim=8, vocab_size=37,
                       attn_layer_idx=[0],
                       attn_cfg=dict(num_heads=2, num_heads_kv=1, causal=True, softmax_scale=scale))
    torch.manual_seed(29)
    mha = _shake(Mamba2LMHeadModel(cfg, dtype=F64), 29).backbone.layers[0].mixer
    x = _randn(2, 6, 16, seed=30)
    s = 1 / math.sqrt(8) if scale is None else scale
    with torch.no_grad():
        proj = F.linear(x, mha.in_proj.weight, mha.in_proj.bias)
        q, k, v = proj[..., :16].unflatten(-1, (2, 8)), proj[..., 16:24], proj[..., 24:32]
        scores = torch.einsum("blhd,bmd->bhlm", q, k) * s
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -INF)
        out = torch.einsum("bhlm,bmd->blhd", scores.softmax(-1), v).flatten(-2)
        want = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        assert _rel(mha(x), want) <= 1e-12


# ===================================================== 11. segments that start inside a cached call

def _hybrid_lm(seed):
    """Mamba-2 layers 0 and 2 with learned initial states, an attention layer at 1."""
    return _mu_lm(seed=seed, d_model=32, n_layer=3, vocab_size=50, attn_layer_idx=[1],
               learnable_init_states=True,
               attn_cfg=dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True,
                             d_conv=3, mlp_dim=16))


def test_packed_pieces_through_a_cache_equal_the_whole_in_logits():
    """Packed rows fed through a cache in pieces (a new segment starting inside a piece, at a
    piece's first token, and one token at a time) give the logits of the whole packed forward, an
    attention layer included: each segment starts from the learned initial state, and the cache's
    segment start and rotary positions move exactly to the new segment's first token. Logits,
    not greedy tokens: an off-by-one start can leave the argmax unchanged."""
    model = _hybrid_lm(31)
    ids = _ids(2, 12, vocab=50, seed=32)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 2 + [2] * 4 + [3] * 6])
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        for sizes in ([4, 3, 1, 1, 3], [6, 6], [1] * 12):
            cache = model.allocate_inference_cache(2, max_seqlen=4)
            outs, s = [], 0
            for k in sizes:
                outs.append(model(ids[:, s:s + k], cache=cache, seq_idx=seq_idx[:, s:s + k]))
                s += k
            assert _rel(torch.cat(outs, 1), whole) <= 1e-12, sizes


def test_left_padded_prompt_decodes_with_the_logits_of_the_prompt_alone():
    """generate's contract at the level of logits: a left-padded prompt (padding as a segment of
    its own) prefilled through a cache, then decoded token by token, gives at every step the
    logits the prompt alone gives."""
    model = _hybrid_lm(33)
    prompt, steps = _ids(1, 3, vocab=50, seed=34), _ids(1, 4, vocab=50, seed=35)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt], 1)
    seq_idx = torch.tensor([[0] * 4 + [1] * 3])
    with torch.no_grad():
        logits = []
        for ids, seg in ((prompt, None), (padded, seq_idx)):
            cache = model.allocate_inference_cache(1)
            out = [model(ids, cache=cache, seq_idx=seg, num_last_tokens=1)[:, -1]]
            out += [model(steps[:, i:i + 1], cache=cache)[:, -1] for i in range(4)]
            logits.append(torch.stack(out))
        assert _rel(logits[1], logits[0]) <= 1e-12
