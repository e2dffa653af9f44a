"""
mamba2.py — Mamba-2 in one file of pure PyTorch (+ einops).

Mamba-2 is the selective state space model of Dao & Gu, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality" (ICML 2024, arXiv 2405.21060).
This file holds the whole of it — layer, language model, checkpoint loading, generation and a command
line — with the semantics of the official implementation (state-spaces/mamba, `mamba_ssm`) and no
custom kernels, so it runs on CPU, CUDA and MPS alike.

    from mamba2 import Mamba2
    layer = Mamba2(d_model=256, d_state=64, d_conv=4, expand=2)
    y = layer(torch.randn(2, 1000, 256))                      # (batch, length, d_model)

    model = Mamba2LMHeadModel.from_pretrained("state-spaces/mamba2-130m")
    tokens = model.generate(input_ids, max_new_tokens=50, do_sample=True, top_p=0.9)

Glossary of dimension letters used in shape comments and einops patterns
    b   batch size
    l   sequence length (tokens)
    d   model width, d_model
    h   number of SSM heads, nheads = d_ssm / headdim
    p   head dimension, headdim
    g   number of B/C groups, ngroups (heads share B and C within a group, like GQA)
    r   heads per group, h / g
    n   state size per channel, d_state (N in the paper)
    c   number of chunks, ceil(l / q)
    q   chunk length, chunk_size (Q in the paper)
    w   convolution width, d_conv

The model, per head (paper eq. 1-2, "SSD" = state space duality):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        state h_t: (p, n), A < 0 a scalar per head
    y_t = h_t C_t + D * x_t
Unrolled, y = M x with the semiseparable matrix M[i, j] = C_i^T B_j * dt_j * exp(sum_{j<k<=i} dt_k A),
which the chunked algorithm (paper section 6) evaluates as quadratic attention-like blocks inside
chunks of q tokens plus a linear recurrence over chunk boundary states.

Layout of this file (read top to bottom):
    1. config            Mamba2Config
    2. functional core   causal_conv1d, decay matrix, ssd (chunked), ssd_step (recurrent)
    3. norm              rms_norm_gated, RMSNormGated
    4. the fused block   mamba_split_conv1d_scan_combined: in_proj output -> out_proj output
    5. cache             InferenceCache
    6. the block         Mamba2 (the layer)
    7. the model         Mamba2Model (backbone), Mamba2LMHeadModel, Mamba2ForSequenceClassification
    8. checkpoints       from_pretrained / save_pretrained (mamba_ssm and transformers formats)
    9. generation        generate with sampling, left padding, eos, streaming
   10. command line      python mamba2.py "prompt" --model ...
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "Mamba2Config", "Mamba2", "RMSNormGated", "InferenceCache", "Mamba2Model", "Mamba2LMHeadModel",
    "Mamba2ForSequenceClassification", "GatedMLP", "causal_conv1d", "ssd", "ssd_step", "rms_norm_gated",
    "mamba_split_conv1d_scan_combined", "seq_idx_from_cu_seqlens", "causal_conv1d_step", "DEFAULT_MODEL",
]

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "models" / "mamba2-pystdlib")
NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"  # the state-spaces checkpoints ship no tokenizer of their own


# ============================================================================================ 1. config

@dataclass
class Mamba2Config:
    """Everything needed to build a Mamba-2 block and language model; field names are the official ones.

    Block fields mirror `mamba_ssm.modules.mamba2.Mamba2.__init__` (plus `learnable_init_states` from
    `Mamba2Simple`); language-model fields mirror `mamba_ssm.models.config_mamba.MambaConfig`.
    `chunk_size` only tiles the computation: results do not depend on it beyond rounding.
    """

    d_model: int
    d_state: int = 128
    d_conv: int = 4
    conv_init: Optional[float] = None
    expand: int = 2
    headdim: int = 64
    d_ssm: Optional[int] = None          # None: the SSM runs over all of d_inner; less leaves a gated MLP
    ngroups: int = 1
    A_init_range: tuple = (1, 16)
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple = (0.0, float("inf"))
    bias: bool = False
    conv_bias: bool = True
    chunk_size: int = 256
    use_mem_eff_path: bool = True
    learnable_init_states: bool = False
    # language model
    n_layer: int = 24
    d_intermediate: int = 0
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    norm_epsilon: float = 1e-5
    rms_norm: bool = True                # False: LayerNorm in the residual stream, as official

    def __post_init__(self):
        self.A_init_range = tuple(self.A_init_range)
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        for name in ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                     "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.d_ssm is None:
            self.d_ssm = self.d_inner
        rules = [
            ("d_ssm", 0 < self.d_ssm <= self.d_inner, f"0 < d_ssm <= d_inner = expand*d_model = {self.d_inner}"),
            ("headdim", self.d_ssm % self.headdim == 0, f"headdim must divide d_ssm = {self.d_ssm}"),
            ("ngroups", (self.d_ssm // self.headdim) % self.ngroups == 0,
             f"ngroups must divide nheads = d_ssm/headdim = {self.d_ssm // self.headdim}"),
            ("A_init_range", len(self.A_init_range) == 2 and 0 < self.A_init_range[0] <= self.A_init_range[1],
             "(low, high) with 0 < low <= high"),
            ("dt_min", 0 < self.dt_min <= self.dt_max, "0 < dt_min <= dt_max"),
            ("dt_init_floor", self.dt_init_floor >= 0, "dt_init_floor >= 0"),
            ("dt_limit", len(self.dt_limit) == 2 and 0 <= self.dt_limit[0] < self.dt_limit[1],
             "(low, high) with 0 <= low < high"),
            ("d_intermediate", isinstance(self.d_intermediate, int) and self.d_intermediate >= 0, "an int >= 0"),
            ("conv_init", self.conv_init is None or self.conv_init > 0, "None or > 0"),
            ("norm_epsilon", self.norm_epsilon > 0, "norm_epsilon > 0"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"Mamba2Config.{name} = {getattr(self, name)!r} breaks the rule: {rule}")

    # derived sizes (official names)
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.headdim

    @property
    def d_mlp(self) -> int:
        """Channels of d_inner outside the SSM: they take the gated-MLP branch silu(z0) * x0."""
        return self.d_inner - self.d_ssm

    @property
    def conv_dim(self) -> int:
        return self.d_ssm + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return asdict(self)


def _block_config(config=None, **kwargs) -> Mamba2Config:
    """Accept either a Mamba2Config or the official keyword form Mamba2(d_model=..., d_state=...)."""
    if config is None:
        return Mamba2Config(**kwargs)
    if isinstance(config, Mamba2Config):
        if kwargs:
            raise TypeError(f"pass either a Mamba2Config or keyword arguments, not both (got {sorted(kwargs)})")
        return config
    if isinstance(config, int) and not isinstance(config, bool):  # Mamba2(256, d_state=64): d_model positional
        return Mamba2Config(d_model=config, **kwargs)
    raise TypeError(f"config must be a Mamba2Config or d_model int, got {type(config).__name__}")


# =================================================================================== 2. functional core

def _recording(*tensors) -> bool:
    """Whether autograd records an operation on these tensors (None allowed). Where it does not, the functions
    below work in place on their own temporaries and on caches; where it does, they build new tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  seq_idx: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None):
    """Depthwise causal convolution over time, optionally continuing from a state and respecting segments.

    x: (b, l, d) channels last; weight: (d, 1, w) as nn.Conv1d stores it; bias: (d,) or None.
    state: (b, d, w) the last w inputs before x (zeros for a fresh sequence).
    seq_idx: (b, l) segment ids; an output never sees an input of another segment.
    Returns y (b, l, d) and the new state (b, d, w): the last w inputs, zero where they belong to a
    segment other than the last one (so that a later call cannot see across that boundary).
    """
    b, l, d = x.shape
    w = weight.shape[-1]
    history = x.new_zeros(b, w, d) if state is None else state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([history, x], dim=1)                             # (b, w + l, d): inputs incl. history
    new_state = xp[:, -w:].clone()        # (b, w, d), its own storage: a view would keep all of xp alive
    if seq_idx is None:
        # One depthwise convolution. (b, w-1+l, d) seen as (b, d, 1, w-1+l) is channels-last already, which
        # oneDNN convolves without a transposing copy: 2.3x faster here than w shifted multiply-adds.
        y = F.conv2d(xp[:, 1:].unsqueeze(1).permute(0, 3, 1, 2), weight.unsqueeze(2), bias, groups=d)
        return y.permute(0, 2, 3, 1).squeeze(1), new_state.transpose(1, 2)     # (b, l, d), (b, d, w)
    # Packed segments: y_t = bias + sum_k taps[k] * x_{t-(w-1)+k} as w shifted multiply-adds, each (output, lag)
    # pair masked so that no output sees an input of another segment. The history belongs to the first segment,
    # like initial_states.
    seg = torch.cat([seq_idx[:, :1].expand(b, w), seq_idx], dim=1)                  # (b, w + l)
    taps = weight[:, 0].t()                                                          # (w, d)
    y = None
    for k in range(w):
        xk = xp[:, k + 1:k + 1 + l] * (seg[:, k + 1:k + 1 + l] == seq_idx).unsqueeze(-1).to(x.dtype)  # lag w-1-k
        y = xk * taps[k] if y is None else y.addcmul_(xk, taps[k])
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    new_state = new_state * (seg[:, -w:] == seq_idx[:, -1:]).unsqueeze(-1)
    return y, new_state.transpose(1, 2)                             # (b, l, d), (b, d, w)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: torch.Tensor):
    """One token of causal_conv1d, in its recurrent form: the window of the last w inputs moves on by one and each
    channel takes one dot product with its taps.

    x: (b, d); weight: (d, 1, w); state: (b, d, w) the last w inputs. Like ssd_step, the state is updated in place
    at inference and left untouched when autograd records. Returns y (b, d) and the new state.
    """
    window = torch.cat([state[..., 1:], x.unsqueeze(-1).to(state.dtype)], dim=-1)  # (b, d, w)
    y = torch.linalg.vecdot(window, weight[:, 0].to(state.dtype))                  # (b, d)
    if bias is not None:
        y = y.add_(bias)
    if not _recording(x, weight, state):
        window = state.copy_(window)
    return y.to(x.dtype), window


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The scan accumulates products of many decays: run it in fp32 (fp64 stays fp64), as the official
    # kernels accumulate in fp32 whatever the input dtype.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunks:
    """A sequence cut into c chunks of q tokens, and what both directions of the scan derive from it.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), all in the compute dtype; seq_idx (b, l) or None.
    The last chunk is padded with dt = 0, which means "no input and no decay", so the state after it is the
    state after the last real token. Every decay is the exponential of a number <= 0.
    """

    def __init__(self, x, dt, A, B, C, chunk_size, seq_idx):
        b, l, h, p = x.shape
        g, n = B.shape[-2:]
        q = min(chunk_size, l)                  # short inputs take one chunk of their own length
        pad = -l % q
        if pad:
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            dt = F.pad(dt, (0, 0, 0, pad))
            if seq_idx is not None:
                seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
        c = (l + pad) // q
        self.b, self.l, self.c, self.q, self.h, self.p, self.g, self.r, self.n = b, l, c, q, h, p, g, h // g, n
        self.x = rearrange(x, "b (c q) h p -> b c q h p", q=q)
        self.dt = rearrange(dt, "b (c q) h -> b c q h", q=q)
        self.xdt = self.x * self.dt[..., None]                                   # (b, c, q, h, p)
        self.cs = (self.dt * A).cumsum_(2)                                       # (b, c, q, h) cumulative dt*A
        self.B = rearrange(B, "b (c q) g n -> b c g q n", q=q)                   # views, no copies
        self.C = rearrange(C, "b (c q) g n -> b c g q n", q=q)
        # Segments (paper: a packed batch is one block-diagonal M). Inside a chunk, token i sees token j only
        # within one segment; a chunk's end state collects only its last segment; the carried state reaches
        # only tokens of the segment it came from, and is dropped across a chunk whose segment changes.
        self.causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()    # (q, q)
        self.to_end = self.from_start = self.carry = None
        if seq_idx is not None:
            seg = seq_idx.view(b, c, q)
            last = seg[..., -1]                                                   # (b, c) segment at chunk end
            before = torch.cat([seg[:, :1, 0], last[:, :-1]], dim=1)             # (b, c) segment carried in
            self.causal = (self.causal & (seg[..., :, None] == seg[..., None, :])).unsqueeze(2)  # (b, c, 1, q, q)
            self.to_end = (seg == last[..., None]).unsqueeze(-1)                  # (b, c, q, 1)
            self.from_start = (seg == before[..., None]).unsqueeze(-1)            # (b, c, q, 1)
            self.carry = (last == before).unsqueeze(-1)                           # (b, c, 1)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, q, h, p) -> (b, c, g, q, r*p), a view: the r heads of a group side by side, so that one matrix
        product per group serves them all (they share B and C)."""
        return t.view(self.b, self.c, self.q, self.g, self.r * self.p).transpose(2, 3)

    def ungrouped(self, t: torch.Tensor) -> torch.Tensor:
        """(..., g, q, r*p) -> (..., q, h, p)."""
        return t.transpose(-3, -2).reshape(*t.shape[:-3], self.q, self.h, self.p)

    def masked_CB(self) -> torch.Tensor:
        """C_i . B_j once per group, zero above the diagonal and across segments: (b, c, g, q, q)."""
        return (self.C @ self.B.transpose(-1, -2)).masked_fill_(~self.causal, 0)

    def decay_matrix(self) -> torch.Tensor:
        """L[i, j] = exp(cs_i - cs_j), the decay from token j to token i, per head: (b, c, h, q, q).

        Above the diagonal cs_i - cs_j >= 0 could overflow exp: it is clamped to 0 there (L = 1), and the masked
        C Bᵀ it is multiplied with zeroes it. Masking the cheap per-group C Bᵀ instead of the per-head L saves a
        pass over L, and exp never sees -inf (slow on CPU)."""
        cs = rearrange(self.cs, "b c q h -> b c h q").contiguous()   # makes L head-major, as the products need
        return torch.sub(cs[..., :, None], cs[..., None, :]).clamp_(max=0).exp_()

    def decays(self):
        """to_end_j = exp(cs_end - cs_j) and from_start_i = exp(cs_i), (b, c, q, h); the chunk's total decay
        exp(cs_end), (b, c, h); all masked by segment."""
        to_end = torch.exp(self.cs[:, :, -1:] - self.cs)
        from_start = self.cs.exp()
        total = self.cs[:, :, -1].exp()
        if self.to_end is not None:
            to_end.mul_(self.to_end)
            from_start.mul_(self.from_start)
            total.mul_(self.carry)
        return to_end, from_start, total

    def inputs_to_end(self, to_end: torch.Tensor) -> torch.Tensor:
        """(x dt)_j exp(cs_end - cs_j), what each token leaves in the chunk's end state, grouped: (b, c, g, q, r*p)."""
        return self.grouped(self.xdt * to_end[..., None])

    def unchunk(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, q, ...) -> (b, l, ...): drop the padding."""
        return rearrange(t, "b c q ... -> b (c q) ...")[:, :self.l]


def _ssd_forward(ch: _Chunks, D, initial_states, states=None):
    """y (b, c, q, h, p) and the final state (b, h, p, n); with `states` (b, c, h, p, n), also the state entering
    each chunk, for the backward. Runs without autograd, so it works in place."""
    b, c, q, h, p, g, r, n = ch.b, ch.c, ch.q, ch.h, ch.p, ch.g, ch.r, ch.n
    # The chunk's own tokens: y = (C Bᵀ ∘ L) (x dt), the quadratic, attention-like form, batched over chunks.
    scores = ch.decay_matrix()                                                  # (b, c, h, q, q)
    scores.view(b, c, g, r, q, q).mul_(ch.masked_CB().unsqueeze(3))           # C Bᵀ broadcast to its r heads
    to_end, from_start, total = ch.decays()
    xw = ch.inputs_to_end(to_end)                                               # (b, c, g, q, r*p)
    state = ch.x.new_zeros(b, h, p, n) if initial_states is None else initial_states.clone()
    y = ch.x.new_empty(b, c, q, h, p)
    # Across chunks, a linear recurrence on the state at chunk boundaries. One chunk at a time keeps the state
    # hot in cache between reading it out and passing it on, and time and memory linear in l.
    for i in range(c):
        if states is not None:
            states[:, i] = state
        # what the carried-in state gives each token: exp(cs_t) C_tᵀ S
        y_off = ch.C[:, i] @ state.view(b, g, r * p, n).transpose(-1, -2)       # (b, g, q, r*p)
        # plus what the chunk's own tokens give it
        y_diag = scores[:, i] @ ch.xdt[:, i].transpose(1, 2)                    # (b, h, q, p)
        torch.addcmul(y_diag.transpose(1, 2), ch.ungrouped(y_off), from_start[:, i, :, :, None], out=y[:, i])
        # S <- exp(sum of dt A over the chunk) S + sum_j exp(cs_end - cs_j) (x dt)_j B_jᵀ
        state.mul_(total[:, i, :, None, None])
        state.view(b * g, r * p, n).baddbmm_(xw[:, i].reshape(b * g, q, r * p).transpose(1, 2),
                                             ch.B[:, i].reshape(b * g, q, n))
    if D is not None:
        y.addcmul_(ch.x, D if D.dim() == 2 else D[:, None])
    return y, state


def _ssd_backward(ch: _Chunks, A, D, dy, dfinal, states):
    """The adjoint of _ssd_forward: gradients for (x, dt, A, B, C, D, initial_states), from dy (b, l, h, p) and
    dfinal (b, h, p, n), either of which may be None, and the states entering each chunk (b, c, h, p, n).
    Each product of the forward appears transposed; dcs collects what every decay exp(...) contributes."""
    b, c, q, h, p, g, r, n, l = ch.b, ch.c, ch.q, ch.h, ch.p, ch.g, ch.r, ch.n, ch.l
    dyc = ch.x.new_zeros(b, c, q, h, p)
    if dy is not None:
        dyc.view(b, c * q, h, p)[:, :l] = dy
    to_end, from_start, total = ch.decays()
    S = states.view(b, c, g, r * p, n)

    # Reading out the carried state: y_t += exp(cs_t) C_tᵀ S_c.
    dcs = (dyc * ch.ungrouped(ch.C @ S.transpose(-1, -2))).sum(-1).mul_(from_start)   # (b, c, q, h)
    dyw = ch.grouped(dyc * from_start[..., None])                                 # (b, c, g, q, r*p)
    dC = dyw @ S                                                                  # (b, c, g, q, n)
    dS = (dyw.transpose(-1, -2) @ ch.C).view(b, c, h, p, n)                       # dL/dS_c from the read-out
    # The reverse pass over chunks: G_c = dL/dS_{c+1}, the gradient of the state leaving chunk c.
    G = torch.empty_like(dS)
    G[:, -1] = 0 if dfinal is None else dfinal
    for i in range(c - 1, 0, -1):
        torch.addcmul(dS[:, i], G[:, i], total[:, i, :, None, None], out=G[:, i - 1])
    dinitial = torch.addcmul(dS[:, 0], G[:, 0], total[:, 0, :, None, None])
    dcs[:, :, -1] += (G * states).sum((-1, -2)).mul_(total)                       # through exp(cs_end) S_c

    # Passing the state on: S_{c+1} = exp(cs_end) S_c + sum_j exp(cs_end - cs_j) (x dt)_j B_jᵀ.
    Gg = G.view(b, c, g, r * p, n)
    dxw = ch.ungrouped(ch.B @ Gg.transpose(-1, -2))                               # (b, c, q, h, p)
    dxdt = dxw * to_end[..., None]
    dlog_to_end = (dxw * ch.xdt).sum(-1).mul_(to_end)                              # (b, c, q, h)
    dcs -= dlog_to_end
    dcs[:, :, -1] += dlog_to_end.sum(2)
    dB = ch.inputs_to_end(to_end) @ Gg                                            # (b, c, g, q, n)

    # Inside chunks: y_t += sum_j P[t, j] (x dt)_j with P = C Bᵀ ∘ L.
    L = ch.decay_matrix()                                                         # (b, c, h, q, q)
    CB = ch.masked_CB().unsqueeze(3)                                              # (b, c, g, 1, q, q)
    dP = []
    for i in range(c):   # one chunk at a time: head-major views of (b, q, h, p) need no copies this way
        P = (L[:, i].view(b, g, r, q, q) * CB[:, i]).view(b, h, q, q)
        dyh = dyc[:, i].transpose(1, 2)                                           # (b, h, q, p)
        dxdt[:, i] += (P.transpose(-1, -2) @ dyh).transpose(1, 2)
        dP.append(dyh @ ch.xdt[:, i].permute(0, 2, 3, 1))                         # (b, h, q, q)
    dPL = torch.stack(dP, 1).mul_(L).view(b, c, g, r, q, q)                      # dL/d(C Bᵀ), per head
    dseg = (dPL * CB).view(b, c, h, q, q)                                         # dL/d(cs_i - cs_j)
    dcs += (dseg.sum(-1) - dseg.sum(-2)).transpose(2, 3)
    dCB = dPL.sum(3).masked_fill_(~ch.causal, 0)                                  # (b, c, g, q, q)
    dC += dCB @ ch.B
    dB += dCB.transpose(-1, -2) @ ch.C

    # cs = cumsum(dt A) within chunks, and x dt.
    da = dcs.flip(2).cumsum(2).flip(2)                                             # (b, c, q, h)
    ddt = (dxdt * ch.x).sum(-1).add_(da * A)
    dA = (da * ch.dt).sum((0, 1, 2))
    dx = dxdt.mul_(ch.dt[..., None])
    dD = None
    if D is not None:
        dD = (dyc * ch.x).sum((0, 1, 2))                                           # (h, p)
        dD = dD if D.dim() == 2 else dD.sum(-1)
        dx.addcmul_(dyc, D if D.dim() == 2 else D[:, None])
    dB, dC = (ch.unchunk(t.transpose(2, 3)) for t in (dB, dC))
    return ch.unchunk(dx), ch.unchunk(ddt), dA, dB, dC, dD, dinitial


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with its backward written out, as the official kernels do. Autograd keeps only the
    inputs and the states at chunk boundaries; every other intermediate is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
        ch = _Chunks(x, dt, A, B, C, chunk_size, seq_idx)
        states = x.new_empty(ch.b, ch.c, ch.h, ch.p, ch.n) if any(ctx.needs_input_grad) else None
        y, final = _ssd_forward(ch, D, initial_states, states)
        ctx.save_for_backward(x, dt, A, B, C, D, seq_idx, states)
        ctx.chunk_size, ctx.has_initial = chunk_size, initial_states is not None
        ctx.set_materialize_grads(False)
        return ch.unchunk(y), final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, seq_idx, states = ctx.saved_tensors
        ch = _Chunks(x, dt, A, B, C, ctx.chunk_size, seq_idx)
        dx, ddt, dA, dB, dC, dD, dinitial = _ssd_backward(ch, A, D, dy, dfinal, states)
        return dx, ddt, dA, dB, dC, dD, dinitial if ctx.has_initial else None, None, None


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int, D: Optional[torch.Tensor] = None, initial_states: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None, return_final_states: bool = False):
    """The chunked SSD scan (paper section 6): any length, linear time and memory in l.

    x: (b, l, h, p); dt: (b, l, h) step sizes, already positive (softplus'd, clamped);
    A: (h,) negative decay rates; B, C: (b, l, g, n); D: (h,) or (h, p) skip, or None;
    initial_states: (b, h, p, n) state before the first token (applies to the first segment only);
    seq_idx: (b, l) non-decreasing segment ids: the state is reset where the id changes.
    Returns y (b, l, h, p) in x's dtype, and with return_final_states the state after the last token
    (b, h, p, n) in fp32 (fp64 for fp64 input).

    The sequence is cut into chunks of q tokens. With cs the cumulative sum of dt*A inside a chunk:
      1. the chunk's own tokens, in the quadratic form y_t = sum_{j<=t} (C_t . B_j) exp(cs_t - cs_j) (x dt)_j;
      2. what the state S entering the chunk adds: y_t += exp(cs_t) C_tᵀ S;
      3. the state passed on: S <- exp(cs_end) S + sum_j exp(cs_end - cs_j) (x dt)_j B_jᵀ.
    Steps 2-3 are a linear recurrence over chunks (a chunks x chunks decay matrix would be quadratic in l).
    Gradients come from the adjoint of these steps (_ssd_backward), not from recording them.
    """
    out_dtype, cdt = x.dtype, _compute_dtype(x.dtype)
    x, dt, A, B, C, D, initial_states = (None if t is None else t.to(cdt) for t in (x, dt, A, B, C, D, initial_states))
    y, final = _ChunkedScan.apply(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size)
    y = y.to(out_dtype)
    return (y, final) if return_final_states else y


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, D: Optional[torch.Tensor] = None):
    """One token of the recurrence, constant time: returns (y, new state).

    Without autograd recording (inference) the new state *is* `state`, updated in place with no allocation;
    when some input requires grad it is built out of place, leaving `state` untouched for backward.

    x: (b, h, p); dt: (b, h) positive; A: (h,); B, C: (b, g, n); state: (b, h, p, n); D: (h,) or (h, p).
    Returns y (b, h, p) in x's dtype and the state after the token, in the state's dtype.
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    cdt = state.dtype
    decay = torch.exp(dt * A).to(cdt).view(b * g, r, 1, 1)                        # e^{dt A}, per head
    xdt = (x * dt.unsqueeze(-1)).to(cdt).view(b * g, r * p, 1)                   # dt x
    # The r heads of a group share B and C: one (r*p, n) matrix per group, no per-head copies of B or C.
    Bg, Cg = B.to(cdt).reshape(b * g, 1, n), C.to(cdt).reshape(b * g, n, 1)
    if _recording(x, dt, A, B, C, state):
        s = torch.baddbmm((state.view(b * g, r, p, n) * decay).view(b * g, r * p, n), xdt, Bg)
        new_state = s.view(b, h, p, n)
    else:
        s = state.view(b * g, r, p, n).mul_(decay).view(b * g, r * p, n).baddbmm_(xdt, Bg)  # h = e^{dt A} h + dt x B^T
        new_state = state
    y = torch.bmm(s, Cg).view(b, h, p)                                           # y = h C
    if D is not None:
        y = torch.addcmul(y, x.to(cdt), D.to(cdt) if D.dim() == 2 else D.to(cdt)[:, None])
    return y.to(x.dtype), new_state


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """dt = softplus(dt + dt_bias) in fp32, clamped to dt_limit when that is not (0, inf)."""
    cdt = _compute_dtype(dt.dtype)
    dt = F.softplus(dt.to(cdt) + dt_bias.to(cdt))
    if dt_limit[0] > 0.0 or dt_limit[1] != math.inf:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """cu_seqlens (n+1,) = [0, l_1, l_1+l_2, ..., seqlen] -> seq_idx (1, seqlen) int32."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor, got "
                        f"{type(cu_seqlens).__name__}{_shape_dtype(cu_seqlens)}")
    if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seqlen}, "
                         f"got {cu_seqlens.tolist()}")
    lengths = cu_seqlens.diff()
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return ids.repeat_interleave(lengths).unsqueeze(0)                        # (1, l)


# ============================================================================================ 3. norm

def rms_norm_gated(x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
                   group_size: Optional[int] = None, norm_before_gate: bool = False) -> torch.Tensor:
    """RMSNorm over contiguous groups of `group_size` channels, optionally gated by silu(z).

    norm_before_gate=True: norm(x) * silu(z); False: norm(x * silu(z)). Statistics in fp32.
    """
    group_size = group_size or x.shape[-1]
    if _recording(x, z, weight):
        return _GatedRMSNorm.apply(x, z, weight, eps, group_size, norm_before_gate)
    return _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)[0]


def _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """(out in x's dtype, rstd (..., groups, 1)). Works in place on its own temporaries, never on x or z."""
    dtype, cdt = x.dtype, _compute_dtype(x.dtype)
    gate = None if z is None else F.silu(z.to(cdt))
    v = x.to(cdt)
    if gate is not None and not norm_before_gate:
        v, gate = gate.mul_(v), None                                          # x * silu(z) is what is normalised
    vg = v.unflatten(-1, (-1, group_size))                                    # (..., groups, group_size)
    rstd = torch.linalg.vector_norm(vg, dim=-1, keepdim=True).square_().div_(group_size).add_(eps).rsqrt_()
    out = (vg.mul_(rstd) if v is not x else vg * rstd).flatten(-2).mul_(weight)
    if gate is not None:
        out.mul_(gate)
    return out.to(dtype), rstd


class _GatedRMSNorm(torch.autograd.Function):
    """rms_norm_gated with its backward written out: keeps x, z and the per-group 1/rms, nothing the size of
    an intermediate."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        out, rstd = _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        cdt, gs, gate_after = _compute_dtype(x.dtype), ctx.group_size, ctx.norm_before_gate
        x32, dout, w = x.to(cdt), dout.to(cdt), weight.to(cdt)
        if z is not None:
            z32 = z.to(cdt)
            sig = torch.sigmoid(z32)
            silu = z32 * sig
        v = x32 * silu if z is not None and not gate_after else x32                # what was normalised
        normed = (v.unflatten(-1, (-1, gs)) * rstd).flatten(-2)                    # v / rms(v), per group
        scale = dout * silu if z is not None and gate_after else dout              # dL/d(normed * weight)
        dweight = (scale * normed).flatten(0, -2).sum(0)
        dn = (scale * w).unflatten(-1, (-1, gs))                                   # dL/d(normed)
        ng = normed.unflatten(-1, (-1, gs))
        dv = (dn - ng * (dn * ng).mean(-1, keepdim=True)).mul_(rstd).flatten(-2)   # through rstd = mean(v^2)^-1/2
        dz = None
        if z is not None:
            dsilu = dout * normed * w if gate_after else dv * x32
            dz = dsilu.mul_(sig * (1 + z32 * (1 - sig))).to(z.dtype)             # silu'(z) = s (1 + z (1 - s))
            if not gate_after:
                dv = dv * silu
        return dv.to(x.dtype), dz, dweight.to(weight.dtype), None, None, None


class RMSNormGated(nn.Module):
    """Gated RMSNorm; with z=None it is the plain RMSNorm used in the residual stream."""

    def __init__(self, d: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        if group_size is not None and d % group_size:
            raise ValueError(f"RMSNormGated: group_size ({group_size}) must divide d ({d})")
        self.eps, self.norm_before_gate, self.group_size = eps, norm_before_gate, group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return rms_norm_gated(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, group_size={self.group_size}, " \
               f"norm_before_gate={self.norm_before_gate}"


# ============================================================================ 4. the fused block function

# Tokens per block when a long input is processed piece by piece (see _split_conv_scan). On a CPU, blocks keep
# every temporary small enough to stay in cache and be reused by the allocator (a fresh multi-megabyte tensor
# costs page faults that can exceed the arithmetic): 1024 measured as fast as 512 at 2k tokens and 5% faster at
# 8k (bench.py --only chunk). On GPUs one pass over the whole sequence is fastest.
SEQ_BLOCK_LEN = {"cpu": 1024}
# The chunk length a block's scan uses on a device when config.chunk_size is larger. The official 256 suits the
# CUDA kernels; the pure-PyTorch scan on a CPU is fastest near 64 (bench.py). Results do not depend on it.
CHUNK_LEN_CAP = {"cpu": 64}


def _split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                     seq_idx=None, dt_limit=(0.0, float("inf")), rmsnorm_weight=None, rmsnorm_eps=1e-6,
                     outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True,
                     conv_state=None, ssm_state=None, block_len=None, in_proj=None, checkpoint=False):
    """The whole block after in_proj, shared by every path (chunked, step, memory-efficient, cached).

    zxbcdt: (b, l, d_in_proj), the in_proj output; or, with `in_proj` (the block's projection, a module or any
    function), its input (b, l, d_model), projected one sequence block at a time so that each projection is
    consumed while it is still in cache. With ssm_state (b, h, p, n) and l == 1 and no seq_idx, the constant-time
    recurrent step runs (in place on ssm_state at inference, see ssd_step); otherwise the chunked scan runs from
    `initial_states`. With `checkpoint`, autograd keeps only each sequence block's input and recomputes the block
    in backward (the memory-efficient path). Returns (out, final ssm state, final conv state).

    A long input runs in blocks of `block_len` tokens that hand their conv and SSM states to the next
    block exactly as a cache does, so the result is the same for any block length.
    """
    b, l, _ = zxbcdt.shape
    weights = dict(conv1d_weight=conv1d_weight, conv1d_bias=conv1d_bias, dt_bias=dt_bias, A=A, D=D,
                   chunk_size=chunk_size, dt_limit=dt_limit, rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps,
                   outproj_weight=outproj_weight, outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups,
                   norm_before_gate=norm_before_gate, in_proj=in_proj)
    run = _split_conv_scan_block
    if checkpoint:
        run = functools.partial(torch.utils.checkpoint.checkpoint, _split_conv_scan_block, use_reentrant=False)
    block_len = block_len or SEQ_BLOCK_LEN.get(zxbcdt.device.type, l)
    if l <= block_len:
        return run(zxbcdt, initial_states, seq_idx, conv_state, ssm_state, **weights)
    outs, state = [], initial_states
    for start in range(0, l, block_len):
        end = min(start + block_len, l)
        seg = None if seq_idx is None else seq_idx[:, start:end]
        if seg is not None and start > 0:   # a segment that starts here must not inherit the states
            keep = seq_idx[:, start] == seq_idx[:, start - 1]                       # (b,)
            conv_state = conv_state * keep[:, None, None]
            state = state * keep[:, None, None, None]
        y, state, conv_state = run(zxbcdt[:, start:end], state, seg, conv_state, None, **weights)
        outs.append(y)
    return torch.cat(outs, dim=1), state, conv_state


def _split_conv_scan_block(zxbcdt, initial_states, seq_idx, conv_state, ssm_state, *, conv1d_weight, conv1d_bias,
                           dt_bias, A, D, chunk_size, dt_limit, rmsnorm_weight, rmsnorm_eps, outproj_weight,
                           outproj_bias, headdim, ngroups, norm_before_gate, in_proj=None):
    if in_proj is not None:
        zxbcdt = in_proj(zxbcdt)                                              # (b, l, d_in_proj)
    b, l, _ = zxbcdt.shape
    nheads = dt_bias.shape[0]
    d_ssm = nheads * headdim
    d_state = (conv1d_weight.shape[0] - d_ssm) // (2 * ngroups)
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * ngroups * d_state - nheads) // 2
    z0, x0, z, xBC, dt = zxbcdt.split_with_sizes([d_mlp, d_mlp, d_ssm, d_ssm + 2 * ngroups * d_state, nheads], -1)

    step = ssm_state is not None and l == 1 and seq_idx is None      # one token through a cache: recurrent form
    if step:
        xBC, conv_state = causal_conv1d_step(xBC[:, 0], conv1d_weight, conv1d_bias, conv_state)
        xBC = xBC.unsqueeze(1)                                                # (b, 1, conv_dim)
    else:
        xBC, conv_state = causal_conv1d(xBC, conv1d_weight, conv1d_bias, seq_idx, conv_state)  # (b, l, conv_dim)
    xBC = F.silu(xBC, inplace=not _recording(xBC))                           # in place on our own output
    x, B, C = xBC.split_with_sizes([d_ssm, ngroups * d_state, ngroups * d_state], -1)
    dt = discretize_dt(dt, dt_bias, dt_limit)                                # (b, l, h) fp32
    if D is not None and D.dim() == 1 and D.shape[0] == d_ssm:               # D_has_hdim
        D = D.view(nheads, headdim)

    if step:
        y, final_state = ssd_step(x.view(b, nheads, headdim), dt[:, 0], A, B.view(b, ngroups, d_state),
                                  C.view(b, ngroups, d_state), ssm_state, D)   # (b, h, p)
    else:
        y, final_state = ssd(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, d_state)),
                             C.unflatten(-1, (ngroups, d_state)), chunk_size, D=D, initial_states=initial_states,
                             seq_idx=seq_idx, return_final_states=True)     # (b, l, h, p)
    y = y.reshape(b, l, d_ssm)

    if rmsnorm_weight is not None:
        y = rms_norm_gated(y, z, rmsnorm_weight, rmsnorm_eps, d_ssm // ngroups, norm_before_gate)
    else:
        y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)                          # (b, l, d_inner)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)                         # (b, l, d_model)
    return y, final_state, conv_state


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """Official fused path: split -> causal conv -> SSD scan -> gate/norm -> out projection, in one call.

    zxbcdt: (b, l, d_in_proj), the in_proj output, laid out [z0, x0, z, xBC, dt]; conv1d_weight:
    (conv_dim, w) or (conv_dim, 1, w); A: (h,); D: (h,) or (d_ssm,). Returns out (b, l, d_model) —
    or (b, l, d_inner) without outproj_weight — and, with return_final_states, the final SSM
    state (b, h, p, n). Same arguments and meaning as `mamba_ssm.ops.triton.ssd_combined`.
    """
    if activation not in ("silu", "swish"):
        raise ValueError(f"activation must be 'silu' (the only one official Mamba-2 uses), got {activation!r}")
    if headdim is None:
        raise TypeError("mamba_split_conv1d_scan_combined: headdim is required")
    if conv1d_weight.dim() == 2:
        conv1d_weight = conv1d_weight.unsqueeze(1)
    out, final_state, _ = _split_conv_scan(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
        rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate)
    return (out, final_state) if return_final_states else out


# =========================================================================================== 5. cache

class InferenceCache:
    """Per-layer decoding state: the last d_conv conv inputs and the SSM state.

    conv_state: (b, conv_dim, d_conv); ssm_state: (b, nheads, headdim, d_state). A forward with a cache
    starts from these and leaves the state after its last token in them, whatever the number of tokens.
    """

    def __init__(self, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                 initial_ssm_state: Optional[torch.Tensor] = None):
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self.initial_ssm_state = initial_ssm_state   # what reset() restores (learned init states), else zeros

    @classmethod
    def alloc(cls, batch_size: int, config: Mamba2Config, device=None, dtype=None) -> "InferenceCache":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        dtype = dtype or torch.get_default_dtype()
        conv = torch.zeros(batch_size, config.conv_dim, config.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, config.nheads, config.headdim, config.d_state, device=device, dtype=dtype)
        return cls(conv, ssm)

    def reset(self) -> "InferenceCache":
        self.conv_state.zero_()
        if self.initial_ssm_state is None:
            self.ssm_state.zero_()
        else:
            self.ssm_state.copy_(self.initial_ssm_state)
        return self

    @property
    def batch_size(self) -> int:
        return self.conv_state.shape[0]

    def __repr__(self) -> str:
        return (f"InferenceCache(conv_state={tuple(self.conv_state.shape)}, ssm_state="
                f"{tuple(self.ssm_state.shape)}, dtype={self.ssm_state.dtype}, device={self.ssm_state.device})")


# ====================================================================================== input checking

def _shape_dtype(t) -> str:
    return f" of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""


def _check_tensor(name: str, t, shape: Sequence, *, floating: Optional[bool] = None, device=None):
    """Raise TypeError/ValueError unless t is a tensor of exactly `shape` (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_seq_idx(seq_idx, b: int, l: int, device) -> torch.Tensor:
    _check_tensor("seq_idx", seq_idx, (b, l), floating=False, device=device)
    if l > 1 and (seq_idx.diff(dim=1) < 0).any():
        raise ValueError("seq_idx must be non-decreasing along the sequence (one segment id per packed sequence)")
    return seq_idx


# =========================================================================================== 6. block

class Mamba2(nn.Module):
    """The Mamba-2 block (official `mamba_ssm.modules.mamba2.Mamba2`): in_proj -> conv -> SSD -> norm -> out_proj.

    Build with a Mamba2Config, or with the official keywords: Mamba2(d_model=256, d_state=64, expand=2).
    """

    def __init__(self, config: Optional[Mamba2Config] = None, layer_idx: Optional[int] = None, device=None,
                 dtype=None, **kwargs):
        super().__init__()
        cfg = self.config = _block_config(config, **kwargs)
        self.layer_idx = layer_idx
        factory = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias, **factory)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, padding=cfg.d_conv - 1,
                                bias=cfg.conv_bias, **factory)
        if cfg.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -cfg.conv_init, cfg.conv_init)
        if cfg.learnable_init_states:
            self.init_states = nn.Parameter(torch.zeros(cfg.nheads, cfg.headdim, cfg.d_state, **factory))

        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor
        u = torch.rand(cfg.nheads, device=device)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype))
        A = torch.empty(cfg.nheads, device=device).uniform_(*cfg.A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype))                     # A = -exp(A_log) < 0
        self.D = nn.Parameter(torch.ones(cfg.d_ssm if cfg.D_has_hdim else cfg.nheads, **factory))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

        if cfg.rmsnorm:
            self.norm = RMSNormGated(cfg.d_ssm, eps=1e-5, norm_before_gate=cfg.norm_before_gate,
                                     group_size=cfg.d_ssm // cfg.ngroups, **factory)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias, **factory)

    def scan_arguments(self) -> dict:
        """The block's parameters as `mamba_split_conv1d_scan_combined` takes them (one place for all paths)."""
        cfg, conv, out, A_log = self.config, self.conv1d, self.out_proj, self.A_log
        norm = self.norm if cfg.rmsnorm else None
        return dict(conv1d_weight=conv.weight, conv1d_bias=conv.bias, dt_bias=self.dt_bias,
                    A=-torch.exp(A_log.to(_compute_dtype(A_log.dtype))), D=self.D, dt_limit=cfg.dt_limit,
                    chunk_size=min(cfg.chunk_size, CHUNK_LEN_CAP.get(A_log.device.type, cfg.chunk_size)),
                    rmsnorm_weight=None if norm is None else norm.weight,
                    rmsnorm_eps=1e-6 if norm is None else norm.eps, outproj_weight=out.weight, outproj_bias=out.bias,
                    headdim=cfg.headdim, ngroups=cfg.ngroups, norm_before_gate=cfg.norm_before_gate)

    def forward(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, initial_states: Optional[torch.Tensor] = None,
                return_final_states: bool = False, cache: Optional[InferenceCache] = None):
        """u: (b, l, d_model) -> y (b, l, d_model) [, final_states (b, h, p, n)].

        seq_idx (b, l) / cu_seqlens (n+1,): packed sequences that never see each other.
        initial_states (b, h, p, n): the state before the first token (default: the learned
        init_states when learnable_init_states, else zeros).
        cache: an InferenceCache to start from and update in place (prompt, pieces or single tokens).
        Final states come back in fp32 (fp64 for fp64 input), the precision the scan runs in.
        """
        b, l, seq_idx, initial_states = self._check_inputs(u, seq_idx, cu_seqlens, initial_states, cache)
        args = dict(self.scan_arguments(), in_proj=self.in_proj)
        if cache is not None:
            # Under autograd the graph keeps the states it started from: give it copies, as the cache is
            # overwritten below (at inference the step updates the cache in place, with no copy at all).
            ssm, conv = cache.ssm_state, cache.conv_state
            if torch.is_grad_enabled():
                ssm, conv = ssm.clone(), conv.clone()
            y, state, conv_state = _split_conv_scan(u, initial_states=ssm, seq_idx=seq_idx, conv_state=conv,
                                                    ssm_state=ssm, **args)
            if state is cache.ssm_state:   # the step updated it in place; a returned state must not change later
                state = state.clone() if return_final_states else None
            else:
                cache.ssm_state.copy_(state.detach())
            if conv_state is not cache.conv_state:
                cache.conv_state.copy_(conv_state.detach())
        else:
            # The memory-efficient path keeps only each sequence block's input u and recomputes the block (in_proj,
            # conv, scan, norm, out_proj) in backward: same function, no second copy of the math.
            checkpoint = self.config.use_mem_eff_path and _recording(u, *self.parameters())
            y, state, _ = _split_conv_scan(u, initial_states=initial_states, seq_idx=seq_idx, checkpoint=checkpoint,
                                           **args)
        return (y, state) if return_final_states else y

    def _check_inputs(self, u, seq_idx, cu_seqlens, initial_states, cache):
        cfg = self.config
        _check_tensor("u", u, (None, None, cfg.d_model), floating=True)
        b, l, _ = u.shape
        if l < 1:
            raise ValueError(f"u must hold at least one token, got shape {tuple(u.shape)}")
        if not torch.is_autocast_enabled(u.device.type) and u.dtype != self.in_proj.weight.dtype:
            raise TypeError(f"u has dtype {u.dtype} but the layer's weights are {self.in_proj.weight.dtype}")
        if cu_seqlens is not None:
            if seq_idx is not None:
                raise ValueError("pass either seq_idx or cu_seqlens, not both")
            if b != 1:
                raise ValueError(f"cu_seqlens packs sequences into batch size 1, got u of batch size {b}")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens.to(u.device), l)
        if seq_idx is not None:
            _check_seq_idx(seq_idx, b, l, u.device)
        shape = (b, cfg.nheads, cfg.headdim, cfg.d_state)
        if initial_states is not None:
            _check_tensor("initial_states", initial_states, shape, floating=True, device=u.device)
        if cache is not None:
            if not isinstance(cache, InferenceCache):
                raise TypeError(f"cache must be an InferenceCache, got {type(cache).__name__}")
            if initial_states is not None:
                raise ValueError("pass either initial_states or a cache (whose ssm_state is the start), not both")
            _check_tensor("cache.ssm_state", cache.ssm_state, shape, floating=True, device=u.device)
            dtype = self.in_proj.weight.dtype
            if cache.ssm_state.dtype != dtype or cache.conv_state.dtype != dtype:
                raise TypeError(f"cache has dtype {cache.ssm_state.dtype}/{cache.conv_state.dtype}, the layer runs "
                                f"in {dtype}; allocate it with allocate_inference_cache")
            _check_tensor("cache.conv_state", cache.conv_state, (b, cfg.conv_dim, cfg.d_conv), floating=True,
                          device=u.device)
        elif initial_states is None and cfg.learnable_init_states:
            initial_states = self.init_states.expand(b, *self.init_states.shape)
        return b, l, seq_idx, initial_states

    def allocate_inference_cache(self, batch_size: int, dtype=None, device=None) -> InferenceCache:
        """A cache for this block, on its device; starts from init_states when they are learned."""
        cache = InferenceCache.alloc(batch_size, self.config, device=device or self.in_proj.weight.device,
                                     dtype=dtype or self.in_proj.weight.dtype)
        if self.config.learnable_init_states:
            start = self.init_states.detach().to(cache.ssm_state.dtype)                # (h, p, n)
            cache.initial_ssm_state = start.expand_as(cache.ssm_state)                  # (b, h, p, n)
            cache.reset()
        return cache


# =========================================================================================== 7. model

class GatedMLP(nn.Module):
    """Official GatedMLP: fc1 -> (y, gate) -> y * silu(gate) -> fc2; hidden rounded up to a multiple of 128."""

    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        hidden = (d_intermediate + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def _residual_norm(config: Mamba2Config, device=None, dtype=None) -> nn.Module:
    if config.rms_norm:
        return RMSNormGated(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)


class Block(nn.Module):
    """Prenorm residual block (official `Block`): add -> norm -> mixer [-> add -> norm2 -> mlp]."""

    def __init__(self, config: Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _residual_norm(config, device, dtype)
        self.mixer = Mamba2(config, layer_idx=layer_idx, device=device, dtype=dtype)
        if config.d_intermediate > 0:
            self.norm2 = _residual_norm(config, device, dtype)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, device=device, dtype=dtype)

    def _add_norm(self, norm, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        hidden = norm(residual.to(norm.weight.dtype))
        return hidden, residual.float() if self.residual_in_fp32 else residual

    def forward(self, hidden, residual=None, cache=None, seq_idx=None):
        hidden, residual = self._add_norm(self.norm, hidden, residual)
        hidden = self.mixer(hidden, seq_idx=seq_idx, cache=cache)
        if hasattr(self, "mlp"):
            hidden, residual = self._add_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual


class Mamba2Model(nn.Module):
    """The backbone: embedding -> n_layer blocks -> norm_f. Returns hidden states (b, l, d_model)."""

    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layer))
        self.norm_f = _residual_norm(config, device, dtype)

    def forward(self, input_ids: torch.Tensor, cache: Optional[list] = None,
                seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(input_ids, cache, seq_idx)
        hidden, residual = self.embedding(input_ids), None                  # (b, l, d_model)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cache=None if cache is None else cache[i], seq_idx=seq_idx)
        residual = hidden if residual is None else hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def _check_inputs(self, input_ids, cache, seq_idx):
        _check_tensor("input_ids", input_ids, (None, None), floating=False, device=self.embedding.weight.device)
        b, l = input_ids.shape
        if l < 1:
            raise ValueError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()                 # one host sync
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{lo}, {hi}]")
        if seq_idx is not None:
            _check_seq_idx(seq_idx, b, l, input_ids.device)
        if cache is not None:   # check every layer's cache before any of them is touched
            if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
                raise TypeError(f"cache must be a list of {len(self.layers)} InferenceCache (see "
                                f"allocate_inference_cache), got {type(cache).__name__}"
                                f"{' of length ' + str(len(cache)) if isinstance(cache, (list, tuple)) else ''}")
            dtype = self.embedding.weight.dtype
            for i, layer in enumerate(self.layers):
                c = cache[i]
                if not isinstance(c, InferenceCache):
                    raise TypeError(f"cache[{i}] must be an InferenceCache, got {type(c).__name__}")
                if c.ssm_state.dtype != dtype or c.conv_state.dtype != dtype:
                    raise TypeError(f"cache[{i}] has dtype {c.ssm_state.dtype}, the model runs in {dtype}")
                cfg = layer.mixer.config
                _check_tensor(f"cache[{i}].conv_state", c.conv_state, (b, cfg.conv_dim, cfg.d_conv),
                              device=input_ids.device)
                _check_tensor(f"cache[{i}].ssm_state", c.ssm_state, (b, cfg.nheads, cfg.headdim, cfg.d_state),
                              device=input_ids.device)

    def allocate_inference_cache(self, batch_size: int, dtype=None) -> list:
        return [layer.mixer.allocate_inference_cache(batch_size, dtype or self.embedding.weight.dtype)
                for layer in self.layers]


def _init_lm_weights(model: nn.Module, n_layer: int):
    """Official LM init: zero biases, N(0, 0.02) embeddings, residual-out weights scaled by 1/sqrt(n_layer).

    (mamba_ssm applies its init twice, the last time with n_residuals_per_layer=1, so the scale is
    1/sqrt(n_layer) with or without the MLP.)
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


# Tokens per chunk of the fused loss: at most 2^25 logits (128 MB in fp32) exist at a time.
LOSS_CHUNK_LOGITS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden @ weight[:vocab]ᵀ against targets, chunk by chunk over tokens, never
    holding the (tokens, vocab) logits: each chunk's softmax becomes its own gradient in place (softmax - one-hot),
    and the gradients of hidden and weight are accumulated at once, so backward only scales them. Same value and
    gradients as F.cross_entropy(hidden @ weight[:vocab]ᵀ, targets, ignore_index=...), with 3 of its 5 passes over
    the logits and a fraction of the memory. Rows of weight past `vocab` (vocabulary padding) get zero gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, vocab):
        n, full, hidden_dtype = hidden.shape[0], weight, hidden.dtype
        cdt = _compute_dtype(weight.dtype)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):   # the products in the autocast dtype, as lm_head(hidden) would be
            hidden, weight = hidden.to(torch.get_autocast_dtype(device)), weight.to(torch.get_autocast_dtype(device))
        weight = weight[:vocab]                                                   # (vocab, d): the real tokens
        valid = targets != ignore_index                                           # (n,)
        scale = 1.0 / valid.sum().to(cdt)                                         # the mean over valid targets
        grads = any(ctx.needs_input_grad[:2])
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(full.shape, dtype=cdt, device=full.device) if ctx.needs_input_grad[1] else None
        chunk = max(1, LOSS_CHUNK_LOGITS // vocab)
        buffer = hidden.new_empty(min(chunk, n), vocab)                          # reused by every chunk
        total = hidden.new_zeros((), dtype=cdt)
        for start in range(0, n, chunk):
            h, t, v = hidden[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            logits = torch.matmul(h, weight.t(), out=buffer[:len(h)]).to(cdt)   # (chunk, vocab)
            lse = torch.logsumexp(logits, -1)                                     # (chunk,)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)   # the target's logit
            total += ((lse - picked) * v).sum()
            if grads:   # d(loss)/d(logits) = (softmax - one-hot) / count, built in place
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -v.to(cdt).unsqueeze(1))
                g.mul_((v * scale).unsqueeze(1))
                if dweight is not None:
                    dweight[:vocab].addmm_(g.t(), h.to(cdt))
                if dhidden is not None:
                    torch.matmul(g.to(weight.dtype), weight, out=dhidden[start:start + chunk])
        ctx.save_for_backward(None if dhidden is None else dhidden.to(hidden_dtype), dweight)
        ctx.weight_dtype = full.dtype
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        dhidden, dweight = ctx.saved_tensors
        dhidden = None if dhidden is None else dhidden * dloss.to(dhidden.dtype)
        dweight = None if dweight is None else (dweight * dloss).to(ctx.weight_dtype)
        return dhidden, dweight, None, None, None


class Mamba2LMHeadModel(nn.Module):
    """Mamba-2 language model with the official structure and state-dict names."""

    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"config must be a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = Mamba2Model(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        _init_lm_weights(self, config.n_layer)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def forward(self, input_ids: torch.Tensor, cache: Optional[list] = None, seq_idx: Optional[torch.Tensor] = None,
                num_last_tokens: int = 0, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, l) -> logits (b, l or num_last_tokens, padded vocab).

        With labels (b, l), returns instead the mean next-token cross-entropy: position t predicts labels[:, t+1]
        (shifted inside, as in transformers), labels of -100 are ignored, and the distribution is over the
        vocab_size real tokens (the vocabulary padding is never a target, nor sampled by generate). It is computed
        without materialising the logits (_LinearCrossEntropy): a fraction of the memory of a loss taken on returned
        logits, at about the same speed."""
        if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens must be an int >= 0, got {num_last_tokens!r}")
        if labels is not None:
            _check_labels(labels, input_ids, self.config.vocab_size)
            if num_last_tokens:
                raise ValueError(f"labels take the loss over every position; num_last_tokens must be 0, "
                                 f"got {num_last_tokens}")
        hidden = self.backbone(input_ids, cache=cache, seq_idx=seq_idx)       # (b, l, d_model)
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)                 # (b, l): the next token, or ignored
            return _LinearCrossEntropy.apply(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(), -100,
                                             self.config.vocab_size)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]                             # logits only where needed
        return self.lm_head(hidden)                                           # (b, l', padded vocab)

    def allocate_inference_cache(self, batch_size: int, dtype=None) -> list:
        """One InferenceCache per layer, accepted (and updated in place) by forward(cache=...)."""
        return self.backbone.allocate_inference_cache(batch_size, dtype)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ----------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], device=None, dtype=None) -> "Mamba2LMHeadModel":
        """Load a checkpoint in the mamba_ssm format (config.json + pytorch_model.bin, e.g. state-spaces/
        mamba2-130m) or the transformers format (model_type "mamba2", model.safetensors, maybe sharded),
        from a local directory or a hub id. Tensors are memory-mapped and converted one at a time into
        `dtype` (default: the checkpoint's); nothing is unpickled beyond plain tensors."""
        path = resolve_checkpoint(name_or_path)
        config, fmt = read_checkpoint_config(path)
        with torch.device("meta"):
            model = cls(config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        tensors = load_checkpoint_tensors(path, lambda t: t.to(device=device, dtype=dtype or t.dtype))
        if fmt == "transformers" and "backbone.embeddings.weight" in tensors:
            tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
        expected = dict(model.state_dict())
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)   # tied: the embedding is the head (official files hold both)
            expected.pop("lm_head.weight")
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing tensors {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(expected[name].shape)}")
        model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()
        return model.eval()

    def save_pretrained(self, directory: Union[str, os.PathLike]):
        """Write config.json (mamba_ssm format) + model.safetensors; from_pretrained reads them back exactly."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for pattern in ("model*.safetensors*", "pytorch_model*.bin*"):   # weights of an earlier save would
            for stale in directory.glob(pattern):                          # shadow or mix with ours on load
                stale.unlink()
        (directory / "config.json").write_text(json.dumps(config_to_mamba_ssm(self.config), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (self.config.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    # ------------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: Optional[torch.Tensor] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id=None,
                 generator: Optional[torch.Generator] = None, streamer=None) -> torch.LongTensor:
        """Prompt (b, l) -> (b, l + new) tokens. Meanings as in transformers' generate; see `generate`."""
        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                        min_p, repetition_penalty, eos_token_id, pad_token_id, generator, streamer)


class Mamba2ForSequenceClassification(nn.Module):
    """Backbone + a linear score head pooled at each row's last real token (padding on either side is ignored)."""

    def __init__(self, config: Mamba2Config, num_labels: int = 2, device=None, dtype=None):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.backbone = Mamba2Model(config, device=device, dtype=dtype)
        self.score = nn.Linear(config.d_model, num_labels, bias=False, device=device, dtype=dtype)
        _init_lm_weights(self, config.n_layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, l), attention_mask (b, l) with one contiguous run of 1s per row -> logits (b, num_labels)."""
        seq_idx = None
        if attention_mask is not None:
            mask = _check_attention_mask(attention_mask, input_ids, contiguous_only=True)   # validates input_ids
            # segments: pads before, the real run, pads after; the real run then sees no padding at all
            seq_idx = F.pad((mask[:, 1:] != mask[:, :-1]).int().cumsum(1), (1, 0)).int()  # (b, l)
        hidden = self.backbone(input_ids, seq_idx=seq_idx)                                   # (b, l, d)
        if attention_mask is None:
            pooled = hidden[:, -1]
        else:
            b, l = mask.shape
            last = l - 1 - mask.flip(1).int().argmax(1)                                      # (b,) last real token
            pooled = hidden[torch.arange(b, device=hidden.device), last]                     # (b, d)
        return self.score(pooled)                                                            # (b, num_labels)


def _check_labels(labels, input_ids, vocab_size: int):
    _check_tensor("labels", labels, tuple(input_ids.shape), floating=False, device=input_ids.device)
    if (((labels < 0) & (labels != -100)) | (labels >= vocab_size)).any():
        raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}) or be -100 (ignored)")


def _check_attention_mask(attention_mask, input_ids, contiguous_only=False, left_only=False) -> torch.Tensor:
    """Validate a 0/1 mask of input_ids' shape; with left_only it must be left padding (0...0 1...1)."""
    _check_tensor("input_ids", input_ids, (None, None), floating=False)
    _check_tensor("attention_mask", attention_mask, tuple(input_ids.shape), device=input_ids.device)
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.bool()
    if not mask.any(1).all():
        raise ValueError("attention_mask has a row with no real token")
    changes = (mask[:, 1:] != mask[:, :-1]).sum(1)
    if left_only and ((mask[:, 1:].int() - mask[:, :-1].int()) < 0).any():
        raise ValueError("attention_mask must be left padding (each row 0...0 1...1); pad prompts on the left")
    if contiguous_only and (changes > 2).any():
        raise ValueError("attention_mask must hold one contiguous run of 1s per row (left or right padding)")
    return mask


# ===================================================================================== 8. checkpoints

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(name_or_path) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (config, weights, tokenizer) to the hub cache."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"checkpoint {str(path)!r} is a file; expected a directory holding config.json and weights")
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise ValueError(f"checkpoint directory {name!r} does not exist (and is not a hub id like "
                         f"'state-spaces/mamba2-130m')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, no huggingface_hub: one clear message
        raise ValueError(f"{name!r} is not a local directory and could not be fetched from the hub "
                         f"({type(e).__name__}: {e})") from e


_TRANSFORMERS_KEYS = dict(hidden_size="d_model", num_hidden_layers="n_layer", state_size="d_state",
                          head_dim="headdim", n_groups="ngroups", expand="expand", conv_kernel="d_conv",
                          chunk_size="chunk_size", time_step_limit="dt_limit", use_bias="bias",
                          use_conv_bias="conv_bias", residual_in_fp32="residual_in_fp32",
                          tie_word_embeddings="tie_embeddings", layer_norm_epsilon="norm_epsilon",
                          vocab_size="vocab_size", time_step_min="dt_min", time_step_max="dt_max",
                          time_step_floor="dt_init_floor")
_FIELDS = [f.name for f in fields(Mamba2Config)]
_BLOCK_FIELDS = _FIELDS[:_FIELDS.index("learnable_init_states") + 1]   # d_model ... learnable_init_states
_LM_KEYS = ("d_model", "n_layer", "d_intermediate", "vocab_size", "pad_vocab_size_multiple", "tie_embeddings",
            "residual_in_fp32", "rms_norm", "norm_epsilon")


def read_checkpoint_config(path: Path):
    """config.json -> (Mamba2Config, 'mamba_ssm' | 'transformers')."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if raw.get("model_type") == "mamba2":
        kw = {ours: raw[theirs] for theirs, ours in _TRANSFORMERS_KEYS.items() if theirs in raw}
        if "dt_limit" in kw:   # transformers 5 writes infinity as {"__float__": "Infinity"}
            kw["dt_limit"] = [float(v["__float__"]) if isinstance(v, dict) else v for v in kw["dt_limit"]]
        d_inner = raw.get("expand", 2) * raw["hidden_size"]
        if "num_heads" in raw and raw["num_heads"] * kw.get("headdim", 64) != d_inner:
            raise ValueError(f"{file}: num_heads * head_dim must equal expand * hidden_size ({d_inner})")
        # transformers never pads the vocabulary and always gates before normalising
        kw.update(pad_vocab_size_multiple=1, norm_before_gate=False, rms_norm=raw.get("rms_norm", True))
        kw.setdefault("tie_embeddings", False)   # transformers' Mamba2Config default
        return Mamba2Config(**kw), "transformers"
    if "d_model" in raw and "n_layer" in raw:
        ssm_cfg = dict(raw.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba2")
        if layer != "Mamba2":
            raise ValueError(f"{file}: ssm_cfg.layer is {layer!r}; this library implements Mamba2 only")
        if raw.get("attn_layer_idx"):
            raise ValueError(f"{file}: hybrid checkpoints with attention layers (attn_layer_idx="
                             f"{raw['attn_layer_idx']}) are not supported")
        unknown = sorted(set(ssm_cfg) - set(_BLOCK_FIELDS))
        if unknown:
            raise ValueError(f"{file}: unknown ssm_cfg fields {unknown}")
        kw = {k: raw[k] for k in _LM_KEYS if k in raw}
        return Mamba2Config(**kw, **{k: v for k, v in ssm_cfg.items() if k != "d_model"}), "mamba_ssm"
    raise ValueError(f"{file}: unknown checkpoint format (expected mamba_ssm keys d_model/n_layer/ssm_cfg or "
                     f"transformers model_type 'mamba2', got keys {sorted(raw)[:12]})")


def config_to_mamba_ssm(config: Mamba2Config) -> dict:
    """Mamba2Config -> an official-style config.json dict (block fields that differ from defaults go to ssm_cfg)."""
    defaults = {f.name: f.default for f in fields(Mamba2Config)}
    ssm_cfg = {"layer": "Mamba2"}
    for name in _BLOCK_FIELDS[1:]:
        value = getattr(config, name)
        if name == "d_ssm" and value == config.d_inner:
            continue
        if value != defaults[name]:
            ssm_cfg[name] = list(value) if isinstance(value, tuple) else value
    out = {k: getattr(config, k) for k in _LM_KEYS}
    out.update(ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={}, fused_add_norm=True)
    return out


def load_checkpoint_tensors(path: Path, convert=None) -> dict:
    """All weight tensors of a checkpoint directory, memory-mapped, without unpickling anything but tensors.

    `convert` (e.g. a dtype/device cast) is applied to each tensor as it is read, so a checkpoint is never held
    in memory twice (say, in fp32 and in bf16)."""
    path = Path(path)
    candidates = ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                  "pytorch_model.bin"]
    found = next((path / c for c in candidates if (path / c).is_file()), None)
    if found is None:
        raise ValueError(f"checkpoint {str(path)!r} has no weights (looked for {', '.join(candidates)})")
    if found.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{found} is not a valid shard index: {e}") from e
        files = [path / s for s in shards]
    else:
        files = [found]
    tensors = {}
    for f in files:
        tensors.update(_load_weight_file(f, convert or (lambda t: t)))
    return tensors


def _load_weight_file(file: Path, convert) -> dict:
    if not file.is_file():
        raise ValueError(f"weight file {file} is missing")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                return {k: convert(f.get_tensor(k)) for k in f.keys()}
        # legacy (non-zip) torch.save files cannot be memory-mapped; weights_only never runs pickled code
        state = torch.load(str(file), map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise ValueError(f"refusing to load {file}: it holds more than plain tensors (arbitrary pickled "
                             f"objects are never executed)") from e
        raise ValueError(f"cannot read weight file {file} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {k: convert(v) for k, v in state.items()}


# ====================================================================================== 9. generation

def _check_generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty):
    checks = [
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
         and max_new_tokens >= 0, "an int >= 0"),
        ("temperature", temperature, isinstance(temperature, (int, float)) and temperature >= 0, "a number >= 0"),
        ("top_k", top_k, isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0, "an int >= 0"),
        ("top_p", top_p, isinstance(top_p, (int, float)) and 0 < top_p <= 1, "a number in (0, 1]"),
        ("min_p", min_p, isinstance(min_p, (int, float)) and 0 <= min_p <= 1, "a number in [0, 1]"),
        ("repetition_penalty", repetition_penalty,
         isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0, "a number > 0"),
    ]
    for name, value, ok, want in checks:
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r}")


def process_logits(logits: torch.Tensor, seen: Optional[torch.Tensor] = None, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """Next-token scores (b, V) after transformers' processors, in its order: repetition penalty, then (when
    sampling) temperature, top-k, top-p, min-p. Removed tokens get -inf."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:   # CTRL: shrink the logits of tokens already present
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not do_sample:
        return logits
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]            # (b, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)                                           # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False                                                         # keep the best token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -math.inf)
    return logits


def generate(model: Mamba2LMHeadModel, input_ids: torch.Tensor, max_new_tokens: int = 20,
             attention_mask: Optional[torch.Tensor] = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_token_id=None, pad_token_id=None, generator: Optional[torch.Generator] = None,
             streamer=None) -> torch.LongTensor:
    """Autoregressive decoding: one chunked prefill of the prompt (logits for the last position only),
    then one constant-time step per token through the inference cache.

    input_ids (b, l); attention_mask (b, l) for left-padded batches: the padding is a segment of its own
    (seq_idx), so every row gives exactly the tokens its prompt gives alone. eos_token_id: int or list;
    a row that emits one is finished and padded with pad_token_id (default: the first eos id). Sampling
    as transformers (temperature 0 means greedy). streamer: put(tokens) is called with the prompt, then
    with each new (b,) token tensor; end() at the finish. Returns (b, l + new) tokens.
    """
    _check_tensor("input_ids", input_ids, (None, None), floating=False, device=model.device)
    _check_generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    b, l = input_ids.shape
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in eos):
        raise ValueError(f"eos_token_id must be an int or a list of ints >= 0, got {eos_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0 or any(t >= model.config.vocab_size
                                                                           for t in eos + [pad]):
        raise ValueError(f"eos_token_id and pad_token_id must lie in [0, vocab_size={model.config.vocab_size}), "
                         f"got eos_token_id={eos_token_id!r}, pad_token_id={pad_token_id!r}")
    seq_idx = None
    if attention_mask is not None:
        mask = _check_attention_mask(attention_mask, input_ids, left_only=True)
        if not mask.all():
            seq_idx = mask.int()                                         # pads: segment 0, prompt: segment 1
    do_sample = do_sample and temperature > 0
    vocab = model.config.vocab_size

    cache = model.allocate_inference_cache(b)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = model(input_ids, cache=cache, seq_idx=seq_idx, num_last_tokens=1)[:, -1, :vocab]   # (b, V)
    seen = None
    if repetition_penalty != 1.0:   # (b, V): tokens present so far, the prompt's padding excluded
        present = input_ids < vocab if attention_mask is None else mask & (input_ids < vocab)
        rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, l)
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=input_ids.device)
        seen[rows[present], input_ids[present]] = True
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    out = [input_ids]
    for i in range(max_new_tokens):
        scores = process_logits(logits, seen, do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
        if do_sample:
            next_token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)   # (b,)
        else:
            next_token = scores.argmax(-1)                                                          # (b,)
        if eos:
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
            unfinished &= ~torch.isin(next_token, eos_t)
        out.append(next_token[:, None])
        if seen is not None:
            seen[torch.arange(b, device=seen.device), next_token.clamp(max=vocab - 1)] = True
        if streamer is not None:
            streamer.put(next_token.cpu())
        if (eos and not unfinished.any()) or i == max_new_tokens - 1:
            break
        logits = model(next_token[:, None], cache=cache)[:, -1, :vocab]                            # (b, V)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


# ==================================================================================== 10. command line

class TextStreamer:
    """Prints decoded text as tokens arrive (batch size 1); put/end as transformers' streamers."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.tokens, self.printed = [], 0

    def put(self, tokens: torch.Tensor):
        self.tokens.extend(tokens.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):      # wait for the rest of a multi-byte character
            return
        print(text[self.printed:], end="", flush=True, file=self.file)
        self.printed = len(text)

    def end(self):
        print(flush=True, file=self.file)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    has_own = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(str(path) if has_own else NEOX_TOKENIZER)


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def main(argv: Optional[Sequence[str]] = None):
    import argparse
    ap = argparse.ArgumentParser(description="Generate text with a Mamba-2 language model (pure PyTorch).")
    ap.add_argument("prompt", nargs="?", default="def fibonacci(n):", help="text to continue")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="local checkpoint directory or hub id, e.g. state-spaces/mamba2-130m "
                         "(default: the small model shipped in models/)")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)

    device = _pick_device(args.device)
    path = resolve_checkpoint(args.model)
    model = Mamba2LMHeadModel.from_pretrained(path, device=device, dtype=getattr(torch, args.dtype))
    tokenizer = _load_tokenizer(path)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
                         generator=generator, streamer=TextStreamer(tokenizer))
    seconds = time.perf_counter() - start
    new = out.shape[1] - input_ids.shape[1]
    print(f"[{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s on {device}, {args.dtype}]")


if __name__ == "__main__":
    main()
