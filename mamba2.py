"""
mamba2.py — Mamba-2 in one file of pure PyTorch (+ einops).

Mamba-2 is the selective state space model of Dao & Gu, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality" (ICML 2024, arXiv 2405.21060).
This file holds the whole of it — layer, language model, checkpoints, generation and a command
line — with the semantics of the official implementation (state-spaces/mamba, `mamba_ssm`) and no
custom kernels, so it runs on CPU, CUDA and MPS alike.

    from mamba2 import Mamba2, Mamba2LMHeadModel
    layer = Mamba2(d_model=256, d_state=64, d_conv=4, expand=2)
    y = layer(torch.randn(2, 1000, 256))                   # (batch, length, d_model)

    model = Mamba2LMHeadModel.from_pretrained("state-spaces/mamba2-130m")
    tokens = model.generate(input_ids, max_new_tokens=50, do_sample=True, top_p=0.9)

Glossary of the dimension letters in shape comments and einops patterns (paper letters in brackets)
    b   batch size                          l   sequence length (tokens)
    d   model width, d_model                h   SSM heads, nheads = d_ssm / headdim       [H]
    p   head dimension, headdim       [P]   g   groups of heads sharing B and C, ngroups  [G]
    r   heads per group, h / g              n   state size per channel, d_state           [N]
    c   chunks, ceil(l / q)                 q   chunk length, chunk_size                  [Q]
    w   convolution width, d_conv

The model, per head (paper eq. 1-2; "SSD" = state space duality), with a state S_t of shape (p, n):
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_tᵀ           A < 0, a scalar per head
    y_t = S_t C_t + D x_t
Unrolled, y = M (x dt) + D x with the lower-triangular semiseparable matrix
    M[i, j] = C_iᵀ B_j exp(sum_{j<k<=i} dt_k A),        that is M = L ∘ C Bᵀ,
L being the decay matrix. The chunked algorithm (paper section 6, Listing 1) evaluates M in q x q
blocks: the diagonal blocks as quadratic, attention-like products inside chunks, the others through
the states at chunk boundaries, which a linear recurrence passes from chunk to chunk.

Layout of this file (read top to bottom):
     1. config            Mamba2Config
     2. input checks      the validation every public entry point shares
     3. functional core   causal_conv1d (+ _step), ssd (chunked: Listing 1's steps 1-4), ssd_step
     4. norm              rms_norm_gated, RMSNormGated
     5. cache             InferenceCache
     6. the block         BlockWeights, mamba2_block (the pipeline), Mamba2 (the layer),
                          mamba_split_conv1d_scan_combined (the official fused entry point)
     7. attention         rotary, AttentionCache, MHA: the attention layers of hybrid models
     8. context parallel  one sequence split across ranks (cp_group): states in, states out
     9. the model         GatedMLP, Block, Mamba2Model, Mamba2LMHeadModel,
                          Mamba2ForSequenceClassification
    10. the fused loss    next-token cross-entropy without the (tokens x vocabulary) logits
    11. checkpoints       reading and writing the mamba_ssm and transformers formats
    12. generation        sampling, left padding, eos, streaming
    13. command line      python mamba2.py "prompt" --model ...
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import pickle
import re
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "Mamba2Config", "Mamba2", "MHA", "RMSNormGated", "InferenceCache", "AttentionCache",
    "Mamba2Model", "Mamba2LMHeadModel", "Mamba2ForSequenceClassification", "GatedMLP",
    "causal_conv1d", "causal_conv1d_step", "ssd", "ssd_step", "rms_norm_gated",
    "mamba_split_conv1d_scan_combined", "seq_idx_from_cu_seqlens", "DEFAULT_MODEL",
]

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "models" / "mamba2-pystdlib")
NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"  # the state-spaces checkpoints ship no tokenizer


# ======================================================================================== 1. config

@dataclass
class Mamba2Config:
    """Everything that builds a Mamba-2 block and language model, with the official names.

    The block fields mirror `mamba_ssm.modules.mamba2.Mamba2.__init__` (plus `learnable_init_states`
    of `Mamba2Simple`); the language-model fields mirror
    `mamba_ssm.models.config_mamba.MambaConfig`.
    """

    # the block
    d_model: int                            # model width d
    d_state: int = 128                      # state size per channel [N]
    d_conv: int = 4                         # width w of the causal depthwise convolution
    conv_init: Optional[float] = None       # conv taps ~ U(-conv_init, conv_init); None: torch's
    expand: int = 2                         # d_inner = expand * d_model
    headdim: int = 64                       # channels per SSM head [P]
    d_ssm: Optional[int] = None             # channels of d_inner the SSM runs over (None: all);
    #                                         the other d_inner - d_ssm take a gated-MLP branch
    ngroups: int = 1                        # groups of heads that share B and C, like GQA [G]
    A_init_range: tuple = (1, 16)           # -A = exp(A_log) drawn uniformly from this range
    D_has_hdim: bool = False                # the skip D per channel (d_ssm,), not per head (h,)
    rmsnorm: bool = True                    # the block's gated RMSNorm of y by z (False: y*silu(z))
    norm_before_gate: bool = False          # True: norm(y) * silu(z); False: norm(y * silu(z))
    dt_min: float = 0.001                   # initial step sizes: log-uniform in [dt_min, dt_max],
    dt_max: float = 0.1                     #   ...
    dt_init_floor: float = 1e-4             #   ... and at least dt_init_floor
    dt_limit: tuple = (0.0, float("inf"))   # dt = softplus(.) clamped to [low, high]
    bias: bool = False                      # biases in in_proj and out_proj
    conv_bias: bool = True                  # a bias in the convolution
    chunk_size: int = 256                   # chunk length of the scan [Q]; it only tiles the work
    use_mem_eff_path: bool = True           # training keeps each block's input, recomputes the rest
    learnable_init_states: bool = False     # a learned state (h, p, n) every sequence starts from
    # the language model
    n_layer: int = 24                       # residual blocks
    d_intermediate: int = 0                 # hidden width of a GatedMLP after each mixer (0: none)
    vocab_size: int = 50277                 # real tokens
    pad_vocab_size_multiple: int = 16       # embedding and head rows padded to a multiple of this
    tie_embeddings: bool = True             # the LM head is the embedding matrix
    residual_in_fp32: bool = True           # the residual stream kept in fp32
    norm_epsilon: float = 1e-5              # eps of the residual-stream norms (norm, norm2, norm_f)
    rms_norm: bool = True                   # residual-stream norms are RMSNorm (False: LayerNorm);
    #                                         `rmsnorm` above is the block's own gated norm
    # hybrid models (official MambaLMHeadModel): attention layers instead of Mamba-2 blocks
    attn_layer_idx: list = field(default_factory=list)   # the layers that are attention (MHA)
    attn_cfg: dict = field(default_factory=dict)         # MHA's options, official names (see MHA)

    def __post_init__(self):
        for f in fields(self):
            _check_config_field(f.name, getattr(self, f.name), f.type)
        self.A_init_range = tuple(float(v) for v in self.A_init_range)
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        self.attn_layer_idx, self.attn_cfg = list(self.attn_layer_idx), dict(self.attn_cfg)
        if self.d_ssm is None:
            self.d_ssm = self.d_inner
        _check_attention_config(self)
        rules = [
            ("d_ssm", 0 < self.d_ssm <= self.d_inner,
             f"0 < d_ssm <= d_inner = expand * d_model = {self.d_inner}"),
            ("headdim", self.d_ssm % self.headdim == 0,
             f"headdim must divide d_ssm = {self.d_ssm}"),
            ("ngroups", (self.d_ssm // self.headdim) % self.ngroups == 0,
             f"ngroups must divide nheads = d_ssm / headdim = {self.d_ssm // self.headdim}"),
            ("A_init_range", 0 < self.A_init_range[0] <= self.A_init_range[1],
             "(low, high) with 0 < low <= high"),
            ("dt_min", 0 < self.dt_min <= self.dt_max, "0 < dt_min <= dt_max"),
            ("dt_init_floor", self.dt_init_floor >= 0, "dt_init_floor >= 0"),
            ("dt_limit", 0 <= self.dt_limit[0] < self.dt_limit[1], "(low, high), 0 <= low < high"),
            ("conv_init", self.conv_init is None or self.conv_init > 0, "None or > 0"),
            ("norm_epsilon", self.norm_epsilon > 0, "norm_epsilon > 0"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"Mamba2Config.{name} = {getattr(self, name)!r} breaks the rule: "
                                 f"{rule}")

    # derived sizes, official names
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.headdim

    @property
    def d_mlp(self) -> int:
        """Channels of d_inner outside the SSM: the gated-MLP branch silu(z0) * x0."""
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

    @property
    def attention(self) -> dict:
        """attn_cfg with the official MHA defaults filled in (and mlp_dim rounded up to 256s)."""
        o = {**_ATTENTION_DEFAULTS, **self.attn_cfg}
        if o["num_heads"] is not None:
            o["num_heads_kv"] = o["num_heads_kv"] or o["num_heads"]
            o["head_dim"] = o["head_dim"] or self.d_model // o["num_heads"]
        o["mlp_dim"] = (o["mlp_dim"] + 255) // 256 * 256
        return o

    def to_dict(self) -> dict:
        return asdict(self)


# What each annotated type admits: positive ints, numbers, booleans, pairs. `bool` is an int in
# Python and "false" is a true string, so both are refused where they do not belong.
_POSITIVE_INTS = {"d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                  "n_layer", "vocab_size", "pad_vocab_size_multiple"}


class ConfigTypeError(TypeError, ValueError):
    """A Mamba2Config field of the wrong type: both a TypeError and a ValueError (an invalid
    config value), so that either except clause catches it."""


def _check_config_field(name: str, value, annotation: str):
    def wrong_type(want):
        raise ConfigTypeError(f"Mamba2Config.{name} must be {want}, got {value!r} "
                              f"({type(value).__name__})")

    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if value is None and annotation.startswith("Optional"):
        return
    if annotation == "bool":
        if not isinstance(value, bool):
            wrong_type("a bool (True or False)")
    elif annotation in ("int", "Optional[int]"):
        if not isinstance(value, int) or isinstance(value, bool):
            wrong_type("an int" + (" or None" if annotation != "int" else ""))
        if value < (1 if name in _POSITIVE_INTS else 0):
            raise ValueError(f"Mamba2Config.{name} must be an int >= "
                             f"{1 if name in _POSITIVE_INTS else 0}, got {value!r}")
    elif annotation in ("float", "Optional[float]"):
        if not real(value):
            wrong_type("a number" + (" or None" if annotation != "float" else ""))
        if not math.isfinite(value):
            raise ValueError(f"Mamba2Config.{name} must be finite, got {value!r}")
    elif annotation == "list":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            wrong_type("a list of ints")
    elif annotation == "dict":
        if not isinstance(value, dict):
            wrong_type("a dict")
    elif annotation == "tuple":
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(real, value)):
            wrong_type("a pair of numbers (low, high)")
        finite = name != "dt_limit"           # dt_limit's high end may be inf (no limit)
        if any(math.isnan(v) or (finite and math.isinf(v)) for v in value):
            want = "finite numbers" if finite else "no NaN"
            raise ValueError(f"Mamba2Config.{name} must hold {want}, got {value!r}")


# official MHA's options (mamba_ssm.modules.mha.MHA) and their defaults
_ATTENTION_DEFAULTS = dict(num_heads=None, num_heads_kv=None, head_dim=None, mlp_dim=0,
                           qkv_proj_bias=True, out_proj_bias=True, softmax_scale=None,
                           causal=False, d_conv=0, rotary_emb_dim=0, rotary_emb_base=10000.0,
                           rotary_emb_interleaved=False)


def _check_attention_config(cfg: Mamba2Config):
    """attn_layer_idx and attn_cfg: the layers in range, the MHA options of the official names and
    types, and no impossible combination."""
    idx = cfg.attn_layer_idx
    if len(set(idx)) != len(idx) or any(not 0 <= i < cfg.n_layer for i in idx):
        raise ValueError(f"Mamba2Config.attn_layer_idx must hold distinct layers in [0, n_layer="
                         f"{cfg.n_layer}), got {idx!r}")
    unknown = sorted(set(cfg.attn_cfg) - set(_ATTENTION_DEFAULTS))
    if unknown:
        raise ValueError(f"Mamba2Config.attn_cfg has unknown keys {unknown} (MHA takes "
                         f"{sorted(_ATTENTION_DEFAULTS)})")
    if not idx:
        return
    o = cfg.attn_cfg

    def fail(key, want):
        raise ValueError(f"Mamba2Config.attn_cfg[{key!r}] = {o.get(key)!r}: {want}")

    def positive_int(v, zero_ok=False):
        return isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero_ok else 1)

    if not positive_int(o.get("num_heads")):
        fail("num_heads", "a positive int, required for attention layers")
    for key in ("num_heads_kv", "head_dim"):
        if o.get(key) is not None and not positive_int(o[key]):
            fail(key, "None or a positive int")
    for key in ("mlp_dim", "d_conv", "rotary_emb_dim"):
        if key in o and not positive_int(o[key], zero_ok=True):
            fail(key, "an int >= 0")
    for key in ("qkv_proj_bias", "out_proj_bias", "causal", "rotary_emb_interleaved"):
        if key in o and not isinstance(o[key], bool):
            fail(key, "a bool")
    for key in ("softmax_scale", "rotary_emb_base"):
        v = o.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                              not 0 < v < math.inf):
            fail(key, "a finite number > 0" + (" or None" if key == "softmax_scale" else ""))
    a = cfg.attention
    if a["num_heads"] % a["num_heads_kv"]:
        fail("num_heads_kv", f"must divide num_heads = {a['num_heads']}")
    if o.get("head_dim") is None and cfg.d_model % a["num_heads"]:
        fail("num_heads", f"must divide d_model = {cfg.d_model} when head_dim is not given")
    if a["rotary_emb_dim"] % 2 or a["rotary_emb_dim"] > a["head_dim"]:
        fail("rotary_emb_dim", f"must be even and at most head_dim = {a['head_dim']}")


def _block_config(config=None, **kwargs) -> Mamba2Config:
    """A Mamba2Config from either one, or the official keywords Mamba2(d_model=..., d_state=...)."""
    if config is None:
        return Mamba2Config(**kwargs)
    if isinstance(config, Mamba2Config):
        if kwargs:
            raise TypeError(f"pass either a Mamba2Config or keyword arguments, not both "
                            f"(got {sorted(kwargs)})")
        return config
    if isinstance(config, int) and not isinstance(config, bool):   # Mamba2(256, d_state=64)
        return Mamba2Config(d_model=config, **kwargs)
    raise TypeError(f"config must be a Mamba2Config or d_model int, got {type(config).__name__}")


# ================================================================================== 2. input checks

def _shape_dtype(t) -> str:
    return f" of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""


def _check_tensor(name: str, t, shape: Sequence, *, floating: Optional[bool] = None, device=None,
                  dtypes: Optional[tuple] = None):
    """Raise TypeError/ValueError unless t is a tensor of exactly `shape` (None = any size).

    floating=True: a floating-point tensor; False: an integer tensor (not bool); dtypes: one of
    these."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, "
                        f"got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_seq_idx(seq_idx, b: int, l: int, device) -> torch.Tensor:
    _check_tensor("seq_idx", seq_idx, (b, l), floating=False, device=device,
                  dtypes=(torch.int32, torch.int64))
    if l > 1 and (seq_idx.diff(dim=1) < 0).any():
        raise ValueError("seq_idx must be non-decreasing along the sequence "
                         "(one segment id per packed sequence)")
    return seq_idx


def _check_int(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_dt_limit(dt_limit):
    ok = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)
    if not ok:
        raise TypeError(f"dt_limit must be a pair of numbers (low, high), got {dt_limit!r}")
    if not 0 <= dt_limit[0] < dt_limit[1]:
        raise ValueError(f"dt_limit must satisfy 0 <= low < high, got {dt_limit!r}")


def _check_conv_weight(weight, d: int, device) -> torch.Tensor:
    """The depthwise taps as (d, 1, w); (d, w) is accepted too (the official kernels' layout)."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        weight = weight.unsqueeze(1)
    _check_tensor("weight", weight, (d, 1, None), floating=True, device=device)
    if weight.shape[-1] < 1:
        raise ValueError(f"weight must have at least one tap, got shape {tuple(weight.shape)}")
    return weight


def _check_scan_inputs(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
    """ssd's inputs: x (b, l, h, p), B and C (b, l, g, n), every size consistent, nothing left
    to broadcast."""
    _check_tensor("x", x, (None, None, None, None), floating=True)
    b, l, h, p = x.shape
    if l < 1 or b < 1 or h < 1 or p < 1:
        raise ValueError(f"x must have no empty dimension, got shape {tuple(x.shape)}")
    _check_tensor("B", B, (b, l, None, None), floating=True, device=x.device)
    _check_step_sizes(x, dt, A, B, C, D)
    n = B.shape[-1]
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (b, h, p, n), floating=True,
                      device=x.device)
    if seq_idx is not None:
        _check_seq_idx(seq_idx, b, l, x.device)
    _check_int("chunk_size", chunk_size)


def _check_step_sizes(x, dt, A, B, C, D):
    """dt, A, C and D against x (b, [l,] h, p) and B (b, [l,] g, n), for ssd and ssd_step."""
    lead, (h, p) = tuple(x.shape[:-2]), x.shape[-2:]
    g, n = B.shape[-2:]
    _check_tensor("dt", dt, (*lead, h), floating=True, device=x.device)
    _check_tensor("A", A, (h,), floating=True, device=x.device)
    _check_tensor("C", C, tuple(B.shape), floating=True, device=x.device)
    if g < 1 or n < 1 or h % g:
        raise ValueError(f"B and C must hold g >= 1 groups dividing the h = {h} heads of x and "
                         f"n >= 1 states, got shape {tuple(B.shape)}")
    if D is not None:
        if not isinstance(D, torch.Tensor):
            raise TypeError(f"D must be a torch.Tensor or None, got {type(D).__name__}")
        _check_tensor("D", D, (h,) if D.dim() <= 1 else (h, p), floating=True, device=x.device)
    # The scan's decays exp(dt A) are at most 1 (it relies on that); a positive A is the
    # classic slip of passing A_log. (NaN passes: it is poison the scan carries forward.)
    if bool((A > 0).any()):
        raise ValueError(f"A must be <= 0 (decay rates: A = -exp(A_log)), got a maximum of "
                         f"{A.max().item():.4g}")
    if bool((dt < 0).any()):
        raise ValueError(f"dt must be >= 0 (step sizes, after softplus), got a minimum of "
                         f"{dt.min().item():.4g}")


def _check_writable(name: str, t: torch.Tensor):
    """A state about to be updated in place: its own contiguous storage, writable here."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} was made under torch.inference_mode() and cannot be updated "
                         f"outside it: allocate it outside inference mode")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; a state updated in place must not")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (an expanded or strided view cannot be "
                         f"updated in place), got shape {tuple(t.shape)} with strides {t.stride()}")


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """cu_seqlens (k+1,) = [0, l_1, l_1+l_2, ..., seqlen] -> seq_idx (1, seqlen) int32."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor, got "
                        f"{type(cu_seqlens).__name__}{_shape_dtype(cu_seqlens)}")
    if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seqlen}, "
                         f"got {cu_seqlens.tolist()}")
    lengths = cu_seqlens.diff().long()
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return ids.repeat_interleave(lengths).unsqueeze(0)                       # (1, l)


# =============================================================================== 3. functional core

def _recording(*tensors) -> bool:
    """Whether autograd records an operation on these tensors (None allowed). Where it does not, the
    functions below work in place on their own temporaries and on caches; where it does, they build
    new tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without an op when it already is (the decoding step counts its ops)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The scan accumulates products of many decays: it runs in fp32 (fp64 stays fp64), as the
    # official kernels accumulate in fp32 whatever the input dtype.
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  seq_idx: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None):
    """Depthwise causal convolution over time, optionally continuing from a state, by segments.

    x: (b, l, d) channels last; weight: (d, 1, w) as nn.Conv1d stores it, or (d, w); bias: (d,)
    or None. state: (b, d, w) the last w inputs before x (zeros for a fresh sequence).
    seq_idx: (b, l) segment ids; an output never sees an input of another segment.
    Returns y (b, l, d) and the new state (b, d, w): the last w inputs, zero where they belong to a
    segment other than the last one (so that a later call cannot see across that boundary).
    """
    _check_tensor("x", x, (None, None, None), floating=True)
    b, l, d = x.shape
    if min(b, l, d) < 1:
        raise ValueError(f"x must have no empty dimension, got shape {tuple(x.shape)}")
    weight = _check_conv_weight(weight, d, x.device)
    w = weight.shape[-1]
    if bias is not None:
        _check_tensor("bias", bias, (d,), floating=True, device=x.device)
    if seq_idx is not None:
        _check_seq_idx(seq_idx, b, l, x.device)
    if state is not None:
        _check_tensor("state", state, (b, d, w), floating=True, device=x.device)
    return _causal_conv1d(x, weight, bias, seq_idx, state)


def _causal_conv1d(x, weight, bias=None, seq_idx=None, state=None):
    b, l, d = x.shape
    w = weight.shape[-1]
    history = x.new_zeros(b, w, d) if state is None else state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([history, x], dim=1)                       # (b, w + l, d): inputs and history
    new_state = xp[:, -w:].clone()   # (b, w, d), own storage: a view would keep all of xp alive
    if seq_idx is None:
        # One depthwise convolution: (b, w-1+l, d) seen as (b, d, 1, w-1+l) is channels-last
        # already, which oneDNN convolves without a copy (2.3x faster than w multiply-adds here).
        taps = weight.unsqueeze(2)                                            # (d, 1, 1, w)
        y = F.conv2d(xp[:, 1:].unsqueeze(1).permute(0, 3, 1, 2), taps, bias, groups=d)
        return y.permute(0, 2, 3, 1).squeeze(1), new_state.transpose(1, 2)   # (b, l, d), (b, d, w)
    # Packed segments: y_t = bias + sum_k taps[k] x_{t-(w-1)+k}, w shifted multiply-adds, each
    # (output, lag) pair selected so that no output sees another segment's input (selected, not
    # multiplied by 0: 0 * NaN = NaN). The history belongs to the first segment.
    seg = torch.cat([seq_idx[:, :1].expand(b, w), seq_idx], dim=1)           # (b, w + l)
    taps = weight[:, 0].t()                                                   # (w, d)
    y = None
    for k in range(w):                                                        # lag w-1-k
        same = (seg[:, k + 1:k + 1 + l] == seq_idx).unsqueeze(-1)            # (b, l, 1)
        xk = torch.where(same, xp[:, k + 1:k + 1 + l], 0)
        y = xk * taps[k] if y is None else y.addcmul_(xk, taps[k])
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    new_state = torch.where((seg[:, -w:] == seq_idx[:, -1:]).unsqueeze(-1), new_state, 0)
    return y, new_state.transpose(1, 2)                                       # (b, l, d), (b, d, w)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       state: torch.Tensor):
    """One token of causal_conv1d in its recurrent form: the window of the last w inputs moves on
    by one and each channel takes one dot product with its taps.

    x: (b, d); weight: (d, 1, w) or (d, w); state: (b, d, w) the last w inputs. Like ssd_step,
    the state is updated in place at inference and left untouched when autograd records. Returns
    y (b, d) and the new state.
    """
    _check_tensor("x", x, (None, None), floating=True)
    b, d = x.shape
    weight = _check_conv_weight(weight, d, x.device)
    if bias is not None:
        _check_tensor("bias", bias, (d,), floating=True, device=x.device)
    _check_tensor("state", state, (b, d, weight.shape[-1]), floating=True, device=x.device)
    recording = _recording(x, weight, bias, state)
    if not recording:
        _check_writable("state", state)
    y, window = _conv_step(x, weight, bias, state)
    return y, window if recording else state.copy_(window)


def _conv_step(x, weight, bias, state):
    """causal_conv1d_step without writing `state`: y (b, d) and the moved window (b, d, w)."""
    window = torch.cat([state[..., 1:], _cast(x, state.dtype).unsqueeze(-1)], dim=-1)  # (b, d, w)
    y = torch.linalg.vecdot(window, _cast(weight[:, 0], state.dtype))                # (b, d)
    if bias is not None:
        y = y + bias
    return _cast(y, x.dtype), window


class _Chunks:
    """A sequence cut into c chunks of q tokens, with what both directions of the scan derive from
    it, named as in the paper's Listing 1 (`ssd_minimal_discrete`):

        x  (b, c, q, h, p)  the SSM's input, X = x dt (Listing 1's X);  dt (b, c, q, h)
        B, C  (b, c, g, q, n)  group-major views;  A_cumsum (b, c, q, h) = cumsum of dt A in a chunk

    All in the compute dtype. The last chunk is padded with dt = 0, "no input and no decay", so the
    state after it is the state after the last real token; every decay is exp of a number <= 0.
    S0 (b, h, p, n), when given, is the state every segment after the first starts from (learned
    initial states); the first segment starts from the scan's initial_states.

    Without autograd recording every temporary is built in place; when autograd records (the
    double backward recomputes the forward that way) new tensors are built instead.
    """

    def __init__(self, x, dt, A, B, C, chunk_size, seq_idx, S0=None, careful=True):
        self.inplace = not torch.is_grad_enabled()
        b, l, h, p = x.shape
        g, n = B.shape[-2:]
        q = min(chunk_size, l)               # a short input takes one chunk of its own length
        pad = -l % q
        if pad:
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            dt = F.pad(dt, (0, 0, 0, pad))
            if seq_idx is not None:
                seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
        c = (l + pad) // q
        self.b, self.l, self.c, self.q, self.h, self.p, self.g, self.r, self.n = \
            b, l, c, q, h, p, g, h // g, n
        self.x = rearrange(x, "b (c q) h p -> b c q h p", q=q)
        self.dt = rearrange(dt, "b (c q) h -> b c q h", q=q)
        self.B = rearrange(B, "b (c q) g n -> b c g q n", q=q)            # views, no copies
        self.C = rearrange(C, "b (c q) g n -> b c g q n", q=q)
        X = self.x * self.dt[..., None]                                   # (b, c, q, h, p)
        # A non-finite input (a planted NaN, an fp16 overflow) must not reach earlier tokens or
        # other segments: in the products of step 1, 0 * NaN = NaN would carry it backwards in
        # time. Such (token, head) pairs enter the products as zeros, and every output from them on
        # in their segment, and the state they leave, are made NaN instead: the honest result,
        # as the token-by-token recurrence gives it. careful=False skips this (see _ChunkedScan).
        self.careful, self.poisoned, suspect = careful, None, False
        if careful:
            lo, hi = torch.aminmax(X, dim=-1)                             # NaN and ±inf show here
            bad = ~(lo.isfinite() & hi.isfinite())                        # (b, c, q, h)
            suspect = (X.device.type != "cpu" or torch.compiler.is_compiling()
                       or bool(bad.any()))                        # a CPU syncs for free
        if suspect:
            X = torch.where(bad[..., None], 0, X)
            dt_clean = torch.where(bad, 0, self.dt)
        else:
            dt_clean = self.dt
        self.X = X
        self.A_cumsum = torch.cumsum(dt_clean * A, dim=2)                 # (b, c, q, h)
        # Masks (paper: a packed batch is one block-diagonal M). Token i sees token j in its chunk
        # when j <= i within one segment; a chunk's end state collects its last segment only; the
        # state carried into a chunk reaches only tokens of the segment it came from, and does not
        # reach the chunk's end when the segment changes inside the chunk.
        self.visible = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()   # (q, q)
        self.same_segment_as_end = self.same_segment_as_start = self.carries_state = None
        self.init_decay = None
        if seq_idx is not None:
            seg = seq_idx.view(b, c, q)
            last = seg[..., -1]                                           # (b, c) at chunk end
            before = torch.cat([seg[:, :1, 0], last[:, :-1]], dim=1)      # (b, c) carried in
            same = seg[..., :, None] == seg[..., None, :]                 # (b, c, q, q)
            self.visible = (self.visible & same).unsqueeze(2)             # (b, c, 1, q, q)
            self.same_segment_as_end = (seg == last[..., None]).unsqueeze(-1)        # (b, c, q, 1)
            self.same_segment_as_start = (seg == before[..., None]).unsqueeze(-1)    # (b, c, q, 1)
            self.carries_state = (last == before).unsqueeze(-1)                       # (b, c, 1)
            if S0 is not None:
                self._segment_starts(seg)
        self.S0 = None if self.init_decay is None else S0.expand(b, h, p, n)
        if suspect:
            self._poison(bad)

    def _segment_starts(self, seg):
        """init_decay (b, c, q, h): exp(A_cumsum_i - A_cumsum_{s-1}), the decay from the start s
        of token i's segment, for the tokens of segments that start inside the chunk (the others
        have the carried state); base_index (b, c, q) is s - 1 (-1 at the chunk's start)."""
        q = self.q
        starts = F.pad(seg[..., 1:] != seg[..., :-1], (1, 0), value=True)   # (b, c, q)
        position = torch.arange(q, device=seg.device)
        self.base_index = torch.where(starts, position, 0).cummax(-1).values - 1
        index = self.base_index.clamp(min=0)[..., None].expand(-1, -1, -1, self.h)
        base = torch.where(self.base_index[..., None] >= 0, self.A_cumsum.gather(2, index), 0)
        self.init_decay = torch.where(self.same_segment_as_start, 0,
                                      torch.exp(self.A_cumsum - base))    # (b, c, q, h)

    def _poison(self, bad):
        """poisoned (b, c, q, h): the (token, head) pairs at or after a non-finite input in their
        segment of the chunk; the decays poisoned there turn their outputs and states into NaN."""
        if self.same_segment_as_end is None:
            reached = bad.cumsum(2) > 0
        else:
            reached = (self.visible[:, :, 0].to(self.X.dtype) @ bad.to(self.X.dtype)) > 0
        self.poisoned = reached                                           # (b, c, q, h)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, q, h, p) -> (b, c, g, q, r*p), a view: the r heads of a group side by side, so
        that one matrix product per group serves them all (they share B and C)."""
        return t.view(self.b, self.c, self.q, self.g, self.r * self.p).transpose(2, 3)

    def ungrouped(self, t: torch.Tensor) -> torch.Tensor:
        """(..., g, q, r*p) -> (..., q, h, p)."""
        return t.transpose(-3, -2).reshape(*t.shape[:-3], self.q, self.h, self.p)

    def CB(self) -> torch.Tensor:
        """C_i·B_j once per group, zero where token i may not see token j: (b, c, g, q, q).
        Selected, not multiplied, so that a non-finite B_j cannot reach row i < j."""
        CB, hidden = self.C @ self.B.transpose(-1, -2), ~self.visible
        return CB.masked_fill_(hidden, 0) if self.inplace else CB.masked_fill(hidden, 0)

    def L(self) -> torch.Tensor:
        """The decay matrix of the diagonal blocks, L[i, j] = exp(A_cumsum_i - A_cumsum_j), per head
        and head-major, as the products need it: (b, c, h, q, q).

        Above the diagonal the exponent is >= 0 and could overflow: it is clamped to 0 (L = 1) and
        the masked C Bᵀ it meets zeroes it. Masking the per-group C Bᵀ instead of the per-head L
        saves a pass over L, and exp never sees -inf (slow on CPU)."""
        A_cumsum = rearrange(self.A_cumsum, "b c q h -> b c h q").contiguous()
        diff = torch.sub(A_cumsum[..., :, None], A_cumsum[..., None, :])
        return diff.clamp_(max=0).exp_() if self.inplace else diff.clamp(max=0).exp()

    def M(self) -> torch.Tensor:
        """The diagonal blocks of the semiseparable matrix, M = L ∘ C Bᵀ: (b, c, h, q, q), the
        per-group C Bᵀ broadcast to its r heads."""
        b, c, g, r, q = self.b, self.c, self.g, self.r, self.q
        L, CB = self.L().view(b, c, g, r, q, q), self.CB().unsqueeze(3)
        return (L.mul_(CB) if self.inplace else L * CB).view(b, c, self.h, q, q)

    def decays(self):
        """Listing 1's decays, zero where segments cut them: decay_states = exp(A_cumsum_end -
        A_cumsum) from each token to its chunk's end and state_decay_out = exp(A_cumsum) from the
        chunk's start to each token, (b, c, q, h); decay_chunk = exp(A_cumsum_end) across the
        chunk, (b, c, h) (Listing 1's (c+1) x (c+1) matrix holds its products). Poisoned tokens
        get NaN in state_decay_out, a chunk whose end is poisoned NaN in decay_chunk."""
        A_end = self.A_cumsum[:, :, -1:]                                  # (b, c, 1, h)
        decay_states = torch.exp(A_end - self.A_cumsum)
        state_decay_out = self.A_cumsum.exp()
        decay_chunk = A_end[:, :, 0].exp()
        if self.same_segment_as_end is not None:
            decay_states = torch.where(self.same_segment_as_end, decay_states, 0)
            state_decay_out = torch.where(self.same_segment_as_start, state_decay_out, 0)
            decay_chunk = torch.where(self.carries_state, decay_chunk, 0)
        if self.poisoned is not None:
            state_decay_out = torch.where(self.poisoned, math.nan, state_decay_out)
            decay_chunk = torch.where(self.poisoned[:, :, -1], math.nan, decay_chunk)
        return decay_states, state_decay_out, decay_chunk

    def drop_state(self) -> Optional[torch.Tensor]:
        """(b, c, h): where the state carried into a chunk must not reach its end (the segment
        changes, and the chunk's end is not poisoned anyway): selected away, since a non-finite
        state times a zero decay would still be NaN. None without segments."""
        if self.carries_state is None:
            return None
        drop = ~self.carries_state.expand(-1, -1, self.h)
        return drop if self.poisoned is None else drop & ~self.poisoned[:, :, -1]

    def unseen_state(self) -> Optional[torch.Tensor]:
        """(b, c, q, h): the tokens the carried state must not reach (another segment, and not
        poisoned), selected away for the same reason. None without segments."""
        if self.same_segment_as_start is None:
            return None
        unseen = ~self.same_segment_as_start.expand(-1, -1, -1, self.h)
        return unseen if self.poisoned is None else unseen & ~self.poisoned

    def X_to_end(self, decay_states: torch.Tensor) -> torch.Tensor:
        """decay_states_j X_j, what each token leaves in its chunk's end state, grouped:
        (b, c, g, q, r*p)."""
        return self.grouped(self.X * decay_states[..., None])

    def unchunk(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, q, ...) -> (b, l, ...), the padding dropped."""
        return rearrange(t, "b c q ... -> b (c q) ...")[:, :self.l]


def _ssd_forward(ch: _Chunks, D, initial_states, states=None):
    """Listing 1's four steps: y (b, c, q, h, p) and the final state (b, h, p, n); with `states`
    (b, c, h, p, n) given, also the state entering each chunk, which backward needs. In place on
    its own temporaries unless autograd records (ch.inplace)."""
    b, c, q, h, p, g, r, n = ch.b, ch.c, ch.q, ch.h, ch.p, ch.g, ch.r, ch.n
    # 1. Diagonal blocks: Y_diag = M X with M = L ∘ C Bᵀ, batched over all chunks.
    M = ch.M()                                                          # (b, c, h, q, q)
    # 2. Chunk states: each chunk's own tokens leave sum_j decay_states_j X_j B_jᵀ at its end
    #    (the product with B is taken in the loop below, one chunk at a time).
    decay_states, state_decay_out, decay_chunk = ch.decays()
    X_to_end = ch.X_to_end(decay_states)                                # (b, c, g, q, r*p)
    unseen, drop = ch.unseen_state(), ch.drop_state()
    S0 = None if ch.S0 is None else ch.S0.reshape(b, g, r * p, n)
    S = ch.x.new_zeros(b, h, p, n) if initial_states is None else initial_states.clone()
    y = ch.x.new_empty(b, c, q, h, p) if ch.inplace else []
    # 3-4. One chunk at a time: the state S entering chunk i is read out (4), then passed on (3).
    # A linear recurrence keeps time and memory linear in l (Listing 1's (c+1) x (c+1) decay
    # matrix is quadratic), and the state stays in cache between the two steps.
    for i in range(c):
        if states is not None:
            states[:, i] = S
        # 4. State -> output: Y_off = state_decay_out C_tᵀ S, and y = Y_diag + Y_off.
        Y_off = ch.ungrouped(ch.C[:, i] @ S.view(b, g, r * p, n).transpose(-1, -2))  # (b,q,h,p)
        if unseen is not None:
            Y_off = Y_off.masked_fill(unseen[:, i, ..., None], 0)
        if S0 is not None:   # segments that start inside the chunk start from S0
            Y_init = ch.ungrouped(ch.C[:, i] @ S0.transpose(-1, -2))
            Y_off = torch.addcmul(Y_off * state_decay_out[:, i, ..., None], Y_init,
                                  ch.init_decay[:, i, ..., None])
            gate = None
        else:
            gate = state_decay_out[:, i, ..., None]
        Y_diag = (M[:, i] @ ch.X[:, i].transpose(1, 2)).transpose(1, 2)        # (b, q, h, p)
        if ch.inplace and gate is not None:
            torch.addcmul(Y_diag, Y_off, gate, out=y[:, i])
        elif ch.inplace:
            torch.add(Y_diag, Y_off, out=y[:, i])
        else:
            y.append(Y_diag + Y_off * gate if gate is not None else Y_diag + Y_off)
        # 3. State passing: S <- decay_chunk S + (chunk state of step 2).
        S = _pass_state(S, decay_chunk[:, i], None if drop is None else drop[:, i],
                        X_to_end[:, i], ch.B[:, i], ch.inplace)
        if S0 is not None:
            S = S.addcmul_(ch.S0, ch.init_decay[:, i, -1, :, None, None]) if ch.inplace else \
                torch.addcmul(S, ch.S0, ch.init_decay[:, i, -1, :, None, None])
    y = y if ch.inplace else torch.stack(y, dim=1)
    if D is not None:                                                         # the skip D x
        Dm = D if D.dim() == 2 else D[:, None]
        y = y.addcmul_(ch.x, Dm) if ch.inplace else torch.addcmul(y, ch.x, Dm)
    return y, S


def _pass_state(S, decay_chunk, drop, X_to_end, B, inplace):
    """Step 3 for one chunk: S <- decay_chunk S + X_to_endᵀ B, per group one matrix product;
    S (b, h, p, n), decay_chunk and drop (b, h), X_to_end (b, g, q, r*p), B (b, g, q, n)."""
    b, h, p, n = S.shape
    g, q = B.shape[1], B.shape[2]
    X_T = X_to_end.reshape(b * g, q, -1).transpose(1, 2)                      # (b*g, r*p, q)
    if inplace:
        S.mul_(decay_chunk[..., None, None])
        if drop is not None:
            S.masked_fill_(drop[..., None, None], 0)
        S.view(b * g, -1, n).baddbmm_(X_T, B.reshape(b * g, q, n))
        return S
    S = S * decay_chunk[..., None, None]
    if drop is not None:
        S = S.masked_fill(drop[..., None, None], 0)
    return torch.baddbmm(S.reshape(b * g, -1, n), X_T, B.reshape(b * g, q, n)).view(b, h, p, n)


def _ssd_backward(ch: _Chunks, A, D, dy, dfinal, states):
    """The adjoint of _ssd_forward, its steps in reverse (4, 3, 2, 1, then A_cumsum and X = x dt):
    gradients for (x, dt, A, B, C, D, initial_states, S0) from dy (b, l, h, p) and dfinal
    (b, h, p, n), either of which may be None, and `states` (b, c, h, p, n), the state entering
    each chunk. Each product of the forward appears transposed; dA_cumsum gathers what every
    decay contributes. (Inputs are finite here: with a non-finite one the gradients are NaN.)"""
    b, c, q, h, p, g, r, n, l = ch.b, ch.c, ch.q, ch.h, ch.p, ch.g, ch.r, ch.n, ch.l
    dY = ch.x.new_zeros(b, c, q, h, p)
    if dy is not None:
        dY.view(b, c * q, h, p)[:, :l] = dy
    decay_states, state_decay_out, decay_chunk = ch.decays()
    S = states.view(b, c, g, r * p, n)

    # 4. State -> output, Y_off = state_decay_out Cᵀ S: gradients for C, A_cumsum and each S.
    dA_cumsum = (dY * ch.ungrouped(ch.C @ S.transpose(-1, -2))).sum(-1).mul_(state_decay_out)
    dY_off = ch.grouped(dY * state_decay_out[..., None])                      # (b, c, g, q, r*p)
    dC = dY_off @ S                                                           # (b, c, g, q, n)
    dstates = (dY_off.transpose(-1, -2) @ ch.C).view(b, c, h, p, n)
    dS0 = None
    if ch.S0 is not None:   # ... and the segments that start from S0
        S0 = ch.S0.reshape(b, 1, g, r * p, n)
        d_init = (dY * ch.ungrouped(ch.C @ S0.transpose(-1, -2))).sum(-1).mul_(ch.init_decay)
        dY_init = ch.grouped(dY * ch.init_decay[..., None])
        dC += dY_init @ S0
        dS0 = (dY_init.transpose(-1, -2) @ ch.C).sum(1).view(b, h, p, n)
    # 3. State passing, in reverse over chunks: dS_end[i] is the gradient of the state leaving
    #    chunk i, dS_end[i-1] = decay_chunk[i] dS_end[i] + dstates[i].
    dS_end = torch.empty_like(dstates)
    dS_end[:, -1] = 0 if dfinal is None else dfinal
    for i in range(c - 1, 0, -1):
        torch.addcmul(dstates[:, i], dS_end[:, i], decay_chunk[:, i, :, None, None],
                      out=dS_end[:, i - 1])
    dinitial = torch.addcmul(dstates[:, 0], dS_end[:, 0], decay_chunk[:, 0, :, None, None])
    dA_cumsum[:, :, -1] += (dS_end * states).sum((-1, -2)).mul_(decay_chunk)    # via decay_chunk
    if ch.S0 is not None:   # S0 enters each chunk end whose last segment started inside it
        end_decay = ch.init_decay[:, :, -1]                                   # (b, c, h)
        d_end = (dS_end * ch.S0[:, None]).sum((-1, -2)).mul_(end_decay)        # (b, c, h)
        dS0 += (dS_end * end_decay[..., None, None]).sum(1)
        d_init[:, :, -1] += d_end
        # init_decay = exp(A_cumsum_i - A_cumsum_base): the base index gets the opposite gradient
        dA_cumsum += d_init
        index = ch.base_index.clamp(min=0)[..., None].expand(-1, -1, -1, h)
        dA_cumsum.scatter_add_(2, index, -d_init * (ch.base_index[..., None] >= 0))

    # 2. Chunk states, sum_j decay_states_j X_j B_jᵀ: gradients for X, B and A_cumsum.
    dS_end_g = dS_end.view(b, c, g, r * p, n)
    dX_to_end = ch.ungrouped(ch.B @ dS_end_g.transpose(-1, -2))               # (b, c, q, h, p)
    dX = dX_to_end * decay_states[..., None]
    d_log_decay_states = (dX_to_end * ch.X).sum(-1).mul_(decay_states)       # (b, c, q, h)
    dA_cumsum -= d_log_decay_states
    dA_cumsum[:, :, -1] += d_log_decay_states.sum(2)
    dB = ch.X_to_end(decay_states) @ dS_end_g                                 # (b, c, g, q, n)

    # 1. Diagonal blocks, Y_diag = M X with M = L ∘ C Bᵀ: gradients for X, C, B and A_cumsum.
    L = ch.L()                                                                # (b, c, h, q, q)
    CB = ch.CB().unsqueeze(3)                                                 # (b, c, g, 1, q, q)
    dM = []
    for i in range(c):   # per chunk: head-major views of (b, q, h, p) need no copies this way
        M = (L[:, i].view(b, g, r, q, q) * CB[:, i]).view(b, h, q, q)
        dY_i = dY[:, i].transpose(1, 2)                                       # (b, h, q, p)
        dX[:, i] += (M.transpose(-1, -2) @ dY_i).transpose(1, 2)
        dM.append(dY_i @ ch.X[:, i].permute(0, 2, 3, 1))                      # (b, h, q, q)
    dM_L = torch.stack(dM, 1).mul_(L).view(b, c, g, r, q, q)                 # dM ∘ L, per head
    d_log_L = (dM_L * CB).view(b, c, h, q, q)                     # d/d(A_cumsum_i - A_cumsum_j)
    dA_cumsum += (d_log_L.sum(-1) - d_log_L.sum(-2)).transpose(2, 3)
    dCB = dM_L.sum(3).masked_fill_(~ch.visible, 0)                            # (b, c, g, q, q)
    dC += dCB @ ch.B
    dB += dCB.transpose(-1, -2) @ ch.C

    # A_cumsum = cumsum(dt A) within chunks, and X = x dt.
    d_dtA = dA_cumsum.flip(2).cumsum(2).flip(2)                               # (b, c, q, h)
    ddt = (dX * ch.x).sum(-1).add_(d_dtA * A)
    dA = (d_dtA * ch.dt).sum((0, 1, 2))
    dx = dX.mul_(ch.dt[..., None])
    dD = None
    if D is not None:
        dD = (dY * ch.x).sum((0, 1, 2))                                       # (h, p)
        dD = dD if D.dim() == 2 else dD.sum(-1)
        dx.addcmul_(dY, D if D.dim() == 2 else D[:, None])
    dB, dC = (ch.unchunk(t.transpose(2, 3)) for t in (dB, dC))
    return ch.unchunk(dx), ch.unchunk(ddt), dA, dB, dC, dD, dinitial, dS0


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with its backward written out, as the official kernels have one. Autograd
    keeps only the inputs and the states at chunk boundaries; the rest is recomputed in backward.
    Second derivatives (create_graph=True) differentiate a recorded re-run of the forward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, S0, seq_idx, chunk_size):
        # Unpacked on a CPU, a non-finite input anywhere shows in the final state (the state never
        # resets): the scan runs without looking for one, and again carefully only if it shows.
        # (Traced by torch.compile, it always runs carefully: the check would break the graph.)
        fast = seq_idx is None and x.device.type == "cpu" and not torch.compiler.is_compiling()
        ch = _Chunks(x, dt, A, B, C, chunk_size, seq_idx, S0, careful=not fast)
        needs = any(ctx.needs_input_grad)
        states = x.new_empty(ch.b, ch.c, ch.h, ch.p, ch.n) if needs else None
        y, final = _ssd_forward(ch, D, initial_states, states)
        if fast and not bool(torch.isfinite(final).all()):
            ch = _Chunks(x, dt, A, B, C, chunk_size, seq_idx, S0, careful=True)
            y, final = _ssd_forward(ch, D, initial_states, states)
        ctx.careful = ch.careful
        ctx.save_for_backward(x, dt, A, B, C, D, initial_states, S0, seq_idx, states)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return ch.unchunk(y), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_states, S0, seq_idx, states = ctx.saved_tensors
        inputs = (x, dt, A, B, C, D, initial_states, S0)
        if torch.is_grad_enabled():   # create_graph: gradients as a differentiable function
            ch = _Chunks(x, dt, A, B, C, ctx.chunk_size, seq_idx, S0)
            y, final = _ssd_forward(ch, D, initial_states)
            return _grad_of_recorded((ch.unchunk(y), final), (dy, dfinal), inputs,
                                     ctx.needs_input_grad) + (None, None)
        ch = _Chunks(x, dt, A, B, C, ctx.chunk_size, seq_idx, S0, careful=ctx.careful)
        grads = _ssd_backward(ch, A, D, dy, dfinal, states)
        grads = tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))
        if S0 is not None and grads[7] is not None and grads[7].shape != S0.shape:
            grads = grads[:7] + (grads[7].sum_to_size(S0.shape),)
        return grads + (None, None)


def _grad_of_recorded(outputs, grad_outputs, inputs, needs_input_grad) -> tuple:
    """For a double backward: the gradients of recorded `outputs` with respect to the `inputs`
    that need one, themselves recorded (create_graph), None elsewhere."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs_input_grad))
              if need and t is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                [g for _, g in pairs], create_graph=True, allow_unused=True)
    out = [None] * len(inputs)
    for i, gr in zip(wanted, grads):
        out[i] = gr
    return tuple(out)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int, D: Optional[torch.Tensor] = None,
        initial_states: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
        return_final_states: bool = False):
    """The chunked SSD scan (paper section 6, Listing 1): any length, linear time and memory in l.

    x: (b, l, h, p); dt: (b, l, h) step sizes, already positive (softplus'd, clamped);
    A: (h,) negative decay rates; B, C: (b, l, g, n); D: (h,) or (h, p) skip, or None;
    initial_states: (b, h, p, n) the state S before the first token (of the first segment);
    seq_idx: (b, l) non-decreasing segment ids: the state is reset where the id changes.
    Returns y (b, l, h, p) in x's dtype and, with return_final_states, the state after the last
    token (b, h, p, n) in fp32 (fp64 for fp64 input).

    The sequence is cut into chunks of q tokens; A_cumsum is the cumulative sum of dt A in a chunk:
      1. diagonal blocks: y_t = sum_{j<=t} (C_t·B_j) exp(A_cumsum_t - A_cumsum_j) (x dt)_j;
      2. chunk states: the state each chunk's tokens leave at its end,
         sum_j exp(A_cumsum_end - A_cumsum_j) (x dt)_j B_jᵀ;
      3. state passing: S_next = exp(A_cumsum_end) S + (chunk state), from chunk to chunk;
      4. state -> output: y_t += exp(A_cumsum_t) C_tᵀ S, S the state entering t's chunk.
    Steps 3-4 run one chunk at a time (Listing 1's all-chunks decay matrix is quadratic in l).
    Gradients come from the adjoint of these steps (_ssd_backward), not from recording them.
    """
    _check_scan_inputs(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size)
    y, final = _ssd(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)
    return (y, final) if return_final_states else y


def _ssd(x, dt, A, B, C, chunk_size, D=None, initial_states=None, seq_idx=None, S0=None):
    """ssd without the checks, returning (y, final state); S0 (h, p, n), when given, is where
    every segment after the first starts (learned initial states)."""
    out_dtype, cdt = x.dtype, _compute_dtype(x.dtype)
    x, dt, A, B, C, D, initial_states, S0 = (None if t is None else t.to(cdt)
                                             for t in (x, dt, A, B, C, D, initial_states, S0))
    y, final = _ChunkedScan.apply(x, dt, A, B, C, D, initial_states, S0, seq_idx, chunk_size)
    return y.to(out_dtype), final


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, state: torch.Tensor, D: Optional[torch.Tensor] = None):
    """One token of the recurrence, in constant time: returns (y, new state).

    Without autograd recording (inference) the new state *is* `state`, updated in place with no
    allocation; when some input requires grad it is built out of place and `state` is left alone.

    x: (b, h, p); dt: (b, h) positive; A: (h,); B, C: (b, g, n); state: (b, h, p, n);
    D: (h,) or (h, p). Returns y (b, h, p) in x's dtype and the state S after the token.
    """
    _check_tensor("x", x, (None, None, None), floating=True)
    b, h, p = x.shape
    _check_tensor("B", B, (b, None, None), floating=True, device=x.device)
    g, n = B.shape[-2:]
    _check_step_sizes(x, dt, A, B, C, D)
    _check_tensor("state", state, (b, h, p, n), floating=True, device=x.device)
    recording = _recording(x, dt, A, B, C, state)
    if not recording:
        _check_writable("state", state)
    y, update = _ssd_step(x, dt, A, B, C, state, D)
    return y, _apply_step(state, update, inplace=not recording)


class _StepUpdate(NamedTuple):
    """What one recurrent step adds to a state S (b, h, p, n): S <- decay S + X Bᵀ."""
    decay: torch.Tensor      # (b, h) exp(dt A)
    X: torch.Tensor          # (b, h, p) x dt
    B: torch.Tensor          # (b, g, n)


def _ssd_step(x, dt, A, B, C, state, D=None):
    """ssd_step read from `state` without writing it: y (b, h, p) and the _StepUpdate.

    y = C·S_new = decay (S C) + X (B·C): the read-out needs the old state only, so that a model can
    compute every layer before it writes any cache (nothing is half-updated when a call fails)."""
    b, h, p = x.shape
    g, n = B.shape[-2:]
    r, cdt = h // g, state.dtype
    decay = _cast(torch.exp(dt * A), cdt)                                    # (b, h)
    X = _cast(x * dt[..., None], cdt)                                         # (b, h, p)
    B, C = _cast(B, cdt), _cast(C, cdt)                                       # (b, g, n)
    # S C as the row vector Cᵀ times Sᵀ, C broadcast over the r heads of its group (no copies of
    # S): on a CPU this reads S 2.5-3x faster than the column form S @ C (a batched gemv) at
    # batch 8 and 32, and 6x in bf16 (bench.py --only decode).
    S = state.reshape(b, g, r, p, n)
    y = torch.matmul(C[:, :, None, None, :], S.transpose(-1, -2)).view(b, g, r, p)  # S C
    BC = torch.linalg.vecdot(B, C)[..., None, None]                           # (b, g, 1, 1)
    y = y.mul_(decay.view(b, g, r, 1)).addcmul_(X.view(b, g, r, p), BC).view(b, h, p)
    if D is not None:
        y = y.addcmul_(_cast(x, cdt), _cast(D, cdt) if D.dim() == 2 else _cast(D, cdt)[:, None])
    return _cast(y, x.dtype), _StepUpdate(decay, X, B)


def _apply_step(state, update: _StepUpdate, inplace: bool):
    """S <- decay S + X Bᵀ: in place on `state` (inference), or as a new tensor (autograd)."""
    b, h, p, n = state.shape
    g = update.B.shape[1]
    r = h // g
    decay = update.decay.view(b, g, r, 1, 1)
    X, B = update.X.reshape(b, g, r, p, 1), update.B.reshape(b, g, 1, 1, n)   # X Bᵀ broadcast
    if inplace:
        state.view(b, g, r, p, n).mul_(decay).addcmul_(X, B)
        return state
    return torch.addcmul(state.reshape(b, g, r, p, n) * decay, X, B).view(b, h, p, n)


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit=(0.0, float("inf"))):
    """dt = softplus(dt + dt_bias) in fp32, clamped to dt_limit when that is not (0, inf)."""
    cdt = _compute_dtype(dt.dtype)
    dt = F.softplus(_cast(dt, cdt) + _cast(dt_bias, cdt))
    if dt_limit[0] > 0.0 or dt_limit[1] != math.inf:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt



# ========================================================================================== 4. norm

def rms_norm_gated(x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor,
                   eps: float = 1e-5, group_size: Optional[int] = None,
                   norm_before_gate: bool = False) -> torch.Tensor:
    """RMSNorm over contiguous groups of `group_size` channels, optionally gated by silu(z).

    x: (..., d); z: None or x's shape; weight: (d,). norm_before_gate=True: norm(x) * silu(z);
    False: norm(x * silu(z)). Statistics in fp32; the output in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor of at least one dimension, got "
                        f"{type(x).__name__}{_shape_dtype(x)}")
    d = x.shape[-1]
    if z is not None:
        _check_tensor("z", z, tuple(x.shape), floating=True, device=x.device)
    _check_tensor("weight", weight, (d,), floating=True, device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if group_size is not None:
        _check_int("group_size", group_size)
        if d % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the channels of x ({d})")
    if not isinstance(norm_before_gate, bool):
        raise TypeError(f"norm_before_gate must be a bool, got {norm_before_gate!r}")
    return _rms_norm_gated(x, z, weight, eps, group_size or d, norm_before_gate)


def _rms_norm_gated(x, z, weight, eps, group_size, norm_before_gate):
    if _recording(x, z, weight):
        return _GatedRMSNorm.apply(x, z, weight, eps, group_size, norm_before_gate)
    return _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)


def _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """The gated RMSNorm in x's dtype, its statistics in fp32 (fp64 for fp64): one fused
    F.rms_norm per group. In place on its own temporaries unless autograd records them."""
    dtype, cdt = x.dtype, _compute_dtype(x.dtype)
    inplace = not _recording(x, z, weight)
    v, w = _cast(x, cdt), _cast(weight, cdt)
    gate = None if z is None else F.silu(_cast(z, cdt))
    if gate is not None and not norm_before_gate:              # x * silu(z) is normalised
        v, gate = (gate.mul_(v) if inplace else gate * v), None
    if group_size == v.shape[-1]:
        out = F.rms_norm(v, (group_size,), w, eps)
    else:                                                      # per group of group_size channels
        out = F.rms_norm(v.unflatten(-1, (-1, group_size)), (group_size,), None, eps).flatten(-2)
        out = out.mul_(w) if inplace else out * w
    if gate is not None:
        out = out.mul_(gate) if inplace else out * gate
    return _cast(out, dtype)


class _GatedRMSNorm(torch.autograd.Function):
    """rms_norm_gated with its backward written out: keeps only x, z and the weight (1/rms is
    recomputed). Second derivatives differentiate a recorded re-run."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        ctx.save_for_backward(x, z, weight)
        ctx.eps, ctx.group_size, ctx.norm_before_gate = eps, group_size, norm_before_gate
        return _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)

    @staticmethod
    def backward(ctx, dout):
        x, z, weight = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph: gradients as a differentiable function
            out = _gated_rms_norm(x, z, weight, ctx.eps, ctx.group_size, ctx.norm_before_gate)
            return _grad_of_recorded((out,), (dout,), (x, z, weight),
                                     ctx.needs_input_grad) + (None, None, None)
        cdt, gs, gate_after = _compute_dtype(x.dtype), ctx.group_size, ctx.norm_before_gate
        x32, dout, w = x.to(cdt), dout.to(cdt), weight.to(cdt)
        if z is not None:
            z32 = z.to(cdt)
            sig = torch.sigmoid(z32)
            silu = z32 * sig
        v = x32 * silu if z is not None and not gate_after else x32            # what was normalised
        vg = v.unflatten(-1, (-1, gs))
        rstd = vg.square().mean(-1, keepdim=True).add_(ctx.eps).rsqrt_()       # 1 / rms(v)
        normed = (vg * rstd).flatten(-2)                                        # v / rms(v)
        scale = dout * silu if z is not None and gate_after else dout           # d/d(normed * w)
        dweight = (scale * normed).flatten(0, -2).sum(0)
        dn = (scale * w).unflatten(-1, (-1, gs))                                # d/d(normed)
        ng = normed.unflatten(-1, (-1, gs))
        dv = (dn - ng * (dn * ng).mean(-1, keepdim=True)).mul_(rstd).flatten(-2)  # rstd of mean(v²)
        dz = None
        if z is not None:
            dsilu = dout * normed * w if gate_after else dv * x32
            dz = dsilu.mul_(sig * (1 + z32 * (1 - sig))).to(z.dtype)  # silu'(z) = s (1 + z (1 - s))
            if not gate_after:
                dv = dv * silu
        return dv.to(x.dtype), dz, dweight.to(weight.dtype), None, None, None


class RMSNormGated(nn.Module):
    """Gated RMSNorm; with z=None it is the plain RMSNorm of the residual stream."""

    def __init__(self, d: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 group_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if group_size is not None and d % group_size:
            raise ValueError(f"RMSNormGated: group_size ({group_size}) must divide d ({d})")
        self.eps, self.norm_before_gate, self.group_size = eps, norm_before_gate, group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _rms_norm_gated(x, z, self.weight, self.eps, self.group_size or x.shape[-1],
                               self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.numel()}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


# ========================================================================================= 5. cache

class InferenceCache:
    """Per-layer decoding state: the last d_conv inputs of the convolution and the SSM state.

    conv_state: (b, conv_dim, d_conv); ssm_state: (b, nheads, headdim, d_state). A forward with a
    cache starts from these and leaves the states after its last token in them, whatever the
    number of tokens. seq_id (b,) is the segment id of the last token a call with seq_idx left
    (None before any): a later call with seq_idx whose row starts another segment starts that row
    afresh, so that packed input fed in pieces gives what it gives whole.
    """

    def __init__(self, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                 initial_ssm_state: Optional[torch.Tensor] = None):
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self.initial_ssm_state = initial_ssm_state   # what reset() restores (learned), else zeros
        self.seq_id: Optional[torch.Tensor] = None

    @classmethod
    def alloc(cls, batch_size: int, config: Mamba2Config, device=None, dtype=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        dtype = dtype or torch.get_default_dtype()
        kw = dict(device=device, dtype=dtype)
        conv = torch.zeros(batch_size, config.conv_dim, config.d_conv, **kw)
        ssm = torch.zeros(batch_size, config.nheads, config.headdim, config.d_state, **kw)
        return cls(conv, ssm)

    def reset(self) -> "InferenceCache":
        self.conv_state.zero_()
        self.seq_id = None
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
                f"{tuple(self.ssm_state.shape)}, dtype={self.ssm_state.dtype}, "
                f"device={self.ssm_state.device})")


# ===================================================================================== 6. the block

class BlockWeights(NamedTuple):
    """What a Mamba-2 block computes with after in_proj: its weights and options, built in one
    place (Mamba2.weights(), or mamba_split_conv1d_scan_combined for the official entry point) and
    handed as one argument to every path: chunked, stepped, cached, memory-efficient."""

    conv_weight: torch.Tensor                # (conv_dim, 1, w) depthwise taps
    conv_bias: Optional[torch.Tensor]        # (conv_dim,)
    dt_bias: torch.Tensor                    # (h,)
    A: torch.Tensor                          # (h,) = -exp(A_log) < 0, in the scan's dtype
    D: Optional[torch.Tensor]                # (h,) per head, or (h, p) per channel (D_has_hdim)
    dt_limit: tuple                          # dt clamped to (low, high)
    chunk_size: int                          # q
    headdim: int                             # p
    ngroups: int                             # g
    norm_weight: Optional[torch.Tensor]      # (d_ssm,) the gated RMSNorm's; None: y * silu(z)
    norm_eps: float
    norm_before_gate: bool
    out_proj_weight: Optional[torch.Tensor]  # (d_model, d_inner); None: out is the d_inner features
    out_proj_bias: Optional[torch.Tensor]
    in_proj: Optional[Callable] = None       # u (b, l, d_model) -> zxbcdt; None: u is zxbcdt
    init_states: Optional[torch.Tensor] = None   # (h, p, n) learned: where every segment starts

    @property
    def nheads(self) -> int:
        return self.dt_bias.shape[0]

    @property
    def d_ssm(self) -> int:
        return self.nheads * self.headdim

    @property
    def d_state(self) -> int:
        return (self.conv_weight.shape[0] - self.d_ssm) // (2 * self.ngroups)


def mamba2_block(u: torch.Tensor, w: BlockWeights, initial_states=None, seq_idx=None,
                 conv_state=None, step: bool = False):
    """One Mamba-2 block, from in_proj's input u (b, l, d_model) — or its output zxbcdt
    (b, l, d_in_proj) when w.in_proj is None — to out_proj's output. Every path runs this; its
    callers have checked the inputs.

    initial_states (b, h, p, n) and conv_state (b, conv_dim, w) are the SSM state and the last w
    conv inputs before u (None: a fresh sequence); seq_idx (b, l) packs segments. With `step` (one
    token, no seq_idx, both states given) the recurrent forms run instead of the chunked ones.
    Nothing is written: returns (out, the SSM state after u, the conv state after u), where for a
    step the SSM state is the _StepUpdate that moves initial_states on by the token.
    """
    # 1. in_proj, then its output split into the gated-MLP branch (z0, x0), the gate z, the
    #    convolution's input xBC and the step sizes dt
    zxbcdt = u if w.in_proj is None else w.in_proj(u)                   # (b, l, d_in_proj)
    b, l, _ = zxbcdt.shape
    h, p, g, n = w.nheads, w.headdim, w.ngroups, w.d_state
    d_mlp = (zxbcdt.shape[-1] - 2 * w.d_ssm - 2 * g * n - h) // 2
    sizes = [d_mlp, d_mlp, w.d_ssm, w.d_ssm + 2 * g * n, h]
    z0, x0, z, xBC, dt = zxbcdt.split_with_sizes(sizes, -1)

    # 2. causal depthwise convolution over time and SiLU, then xBC split into x, B and C
    if step:
        xBC, conv_state = _conv_step(xBC[:, 0], w.conv_weight, w.conv_bias, conv_state)
        xBC = xBC.unsqueeze(1)                                          # (b, 1, conv_dim)
    else:
        xBC, conv_state = _causal_conv1d(xBC, w.conv_weight, w.conv_bias, seq_idx, conv_state)
    xBC = F.silu(xBC, inplace=not _recording(xBC))                      # in place on our output
    x, B, C = xBC.split_with_sizes([w.d_ssm, g * n, g * n], -1)

    # 3. the SSM: dt = softplus(dt + dt_bias) clamped, then the chunked scan or one step
    dt = discretize_dt(dt, w.dt_bias, w.dt_limit)                       # (b, l, h) fp32
    if step:
        y, ssm_state = _ssd_step(x.view(b, h, p), dt[:, 0], w.A, B.view(b, g, n),
                                 C.view(b, g, n), initial_states, w.D)  # (b, h, p)
    else:
        y, ssm_state = _ssd(x.unflatten(-1, (h, p)), dt, w.A, B.unflatten(-1, (g, n)),
                            C.unflatten(-1, (g, n)), w.chunk_size, w.D, initial_states, seq_idx,
                            S0=None if seq_idx is None else w.init_states)   # (b, l, h, p)
    y = y.reshape(b, l, w.d_ssm)

    # 4. the gated RMSNorm of y by z, grouped like B and C (or y * silu(z)); the MLP branch first
    if w.norm_weight is not None:
        y = _rms_norm_gated(y, z, w.norm_weight, w.norm_eps, w.d_ssm // g, w.norm_before_gate)
    else:
        y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)                      # (b, l, d_inner)

    # 5. out_proj
    if w.out_proj_weight is not None:
        y = F.linear(y, w.out_proj_weight, w.out_proj_bias)             # (b, l, d_model)
    return y, ssm_state, conv_state


# Tokens per span when a long input is processed span by span (see _in_spans). On a CPU, spans
# keep every temporary small enough to stay in cache and be reused by the allocator (a fresh
# multi-megabyte tensor costs page faults that can exceed the arithmetic): 1024 measured as fast
# as 512 at 2k tokens, 5% faster at 8k (bench.py --only chunk). On GPUs one pass is fastest.
SPAN_LEN = {"cpu": 1024}
# The chunk length the scan uses on a device when config.chunk_size is larger. The official 256
# suits the CUDA kernels; the pure-PyTorch scan on a CPU is fastest near 64 (bench.py). Results
# do not depend on it.
CHUNK_LEN_CAP = {"cpu": 64}


def _in_spans(u, w: BlockWeights, initial_states=None, seq_idx=None, conv_state=None,
              step=False, checkpoint=False, span_len=None):
    """mamba2_block over u in spans of SPAN_LEN tokens that hand their conv and SSM states on
    exactly as a cache does, so the result does not depend on the span length. With `checkpoint`
    (the memory-efficient path) autograd keeps only each span's input and recomputes the block in
    backward. Returns (out, ssm state, conv state)."""
    run = mamba2_block
    if checkpoint:
        run = functools.partial(torch.utils.checkpoint.checkpoint, mamba2_block,
                                use_reentrant=False)
    l = u.shape[1]
    span_len = span_len or SPAN_LEN.get(u.device.type, l)
    if l <= span_len:
        return run(u, w, initial_states, seq_idx, conv_state, step)
    outs, state = [], initial_states
    for start in range(0, l, span_len):
        end = min(start + span_len, l)
        seg = None if seq_idx is None else seq_idx[:, start:end]
        if seg is not None and start > 0:
            state, conv_state = _continue_segments(w, state, conv_state, seq_idx[:, start - 1],
                                                   seg)
        y, state, conv_state = run(u[:, start:end], w, state, seg, conv_state, False)
        outs.append(y)
    return torch.cat(outs, dim=1), state, conv_state


def _continue_segments(w: BlockWeights, state, conv_state, last_seq_idx, seq_idx):
    """The states a span (or the next rank's piece) starts from, given those the previous one
    left (b, h, p, n), (b, conv_dim, w) and its last token's segment id (b,): a row whose segment
    goes on keeps them; a row whose segment starts here inherits nothing (init_states, zeros)."""
    keep = seq_idx[:, 0] == last_seq_idx                                        # (b,)
    conv_state = torch.where(keep[:, None, None], conv_state, 0)
    fresh = 0 if w.init_states is None else w.init_states.to(state.dtype)
    return torch.where(keep[:, None, None, None], state, fresh), conv_state


class _CacheUpdate(NamedTuple):
    """The states a cached call leaves behind, computed without writing the cache; commit()
    writes them. A model commits every layer only once all of them have run."""

    cache: "InferenceCache"
    ssm: Union[torch.Tensor, _StepUpdate]    # the state after the call, or a step's update
    conv: torch.Tensor                       # the conv window after the call
    start: torch.Tensor                      # the SSM state the call started from
    seq_id: Optional[torch.Tensor] = None    # (b,) the segment of the call's last token

    def commit(self):
        if isinstance(self.ssm, _StepUpdate):
            _apply_step(self.cache.ssm_state, _StepUpdate(*map(_detached, self.ssm)), inplace=True)
        else:
            self.cache.ssm_state.copy_(_detached(self.ssm))
        self.cache.conv_state.copy_(_detached(self.conv))
        if self.seq_id is not None:
            self.cache.seq_id = self.seq_id.to(torch.int64).clone()

    def final_state(self) -> torch.Tensor:
        """The state after the call, its own tensor (a later call must not change it), in the
        scan's dtype (fp32 for a bf16 cache) as every final state."""
        if not isinstance(self.ssm, _StepUpdate):
            return self.ssm
        cdt = _compute_dtype(self.start.dtype)
        return _apply_step(_cast(self.start, cdt),
                           _StepUpdate(*(_cast(t, cdt) for t in self.ssm)), inplace=False)


class Mamba2(nn.Module):
    """The Mamba-2 block (official `mamba_ssm.modules.mamba2.Mamba2`):
    in_proj -> causal conv -> SSD scan -> gated RMSNorm -> out_proj (see mamba2_block).

    Build it with a Mamba2Config or with the official keywords: Mamba2(d_model=256, d_state=64).
    """

    def __init__(self, config: Optional[Mamba2Config] = None, layer_idx: Optional[int] = None,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        cfg = self.config = _block_config(config, **kwargs)
        self.layer_idx = layer_idx
        factory = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias, **factory)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias, **factory)
        if cfg.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -cfg.conv_init, cfg.conv_init)
        if cfg.learnable_init_states:
            self.init_states = nn.Parameter(torch.zeros(cfg.nheads, cfg.headdim, cfg.d_state,
                                                        **factory))
        # The draws, their order and dtypes are the official ones, so that the same seed gives
        # the same initial values: dt in the module's dtype, A in fp32, D in the default dtype.
        # dt_bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max], floored at dt_init_floor
        u = torch.rand(cfg.nheads, **factory)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(cfg.nheads, dtype=torch.float32, device=device).uniform_(*cfg.A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype))                   # A = -exp(A_log) < 0
        # D in the default dtype as official (fp32 in a bf16 model), or in the module's dtype
        # where that is wider: a float64 module keeps float64 throughout.
        D_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.get_default_dtype())
        self.D = nn.Parameter(torch.ones(cfg.d_ssm if cfg.D_has_hdim else cfg.nheads,
                                         device=device, dtype=D_dtype))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if cfg.rmsnorm:
            self.norm = RMSNormGated(cfg.d_ssm, eps=1e-5, norm_before_gate=cfg.norm_before_gate,
                                     group_size=cfg.d_ssm // cfg.ngroups, **factory)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias, **factory)

    def weights(self) -> BlockWeights:
        """The block's weights and options as one bundle, the one place every path takes them."""
        cfg, A_log = self.config, self.A_log
        norm = self.norm if cfg.rmsnorm else None
        D = self.D.view(cfg.nheads, cfg.headdim) if cfg.D_has_hdim else self.D
        return BlockWeights(
            conv_weight=self.conv1d.weight, conv_bias=self.conv1d.bias, dt_bias=self.dt_bias,
            A=-torch.exp(_cast(A_log, _compute_dtype(A_log.dtype))), D=D, dt_limit=cfg.dt_limit,
            chunk_size=min(cfg.chunk_size, CHUNK_LEN_CAP.get(A_log.device.type, cfg.chunk_size)),
            headdim=cfg.headdim, ngroups=cfg.ngroups,
            norm_weight=None if norm is None else norm.weight,
            norm_eps=1e-6 if norm is None else norm.eps, norm_before_gate=cfg.norm_before_gate,
            out_proj_weight=self.out_proj.weight, out_proj_bias=self.out_proj.bias,
            in_proj=self.in_proj, init_states=getattr(self, "init_states", None))

    def forward(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                initial_states: Optional[torch.Tensor] = None, return_final_states: bool = False,
                cache: Optional[InferenceCache] = None, cp_group=None):
        """u: (b, l, d_model) -> y (b, l, d_model) [, final_states (b, h, p, n)].

        seq_idx (b, l) / cu_seqlens (k+1,): packed sequences that never see each other; each
        starts from the learned init_states with learnable_init_states, else from zeros.
        initial_states (b, h, p, n): the state before the first token (default: as any segment).
        cache: an InferenceCache to start from and to leave the states after u in (a prompt
        whole, in pieces or token by token). Final states are fp32 (fp64 for fp64 input).

        Gradients: explicit states (initial_states -> return_final_states) carry them like the
        whole sequence would; a cache holds detached states, so backpropagation through cached
        calls stops at each call (truncated backpropagation through time).

        cp_group (a torch.distributed process group): context parallelism, see section 8. u is
        this rank's piece of one sequence split over the group's ranks in order; initial_states
        belong to the first rank; a cache must be fresh (a prefill: each rank's ends at its
        piece's end); the final states are those of the whole sequence on every rank
        (differentiable on the last one, which computes them).
        """
        def check():
            if not isinstance(return_final_states, bool):
                raise TypeError(f"return_final_states must be a bool, got "
                                f"{return_final_states!r}")
            return self._check_inputs(u, seq_idx, cu_seqlens, initial_states, cache, cp_group)
        seq_idx, initial_states = check() if cp_group is None else \
            _checked_on_every_rank(cp_group, check)
        if cp_group is not None:
            y, final, update = self._across_ranks(u, seq_idx, initial_states, cache, cp_group,
                                                  return_final_states)
            if update is not None:
                update.commit()
            return (y, final) if return_final_states else y
        if cache is not None:
            y, update = self._through_cache(u, cache, seq_idx)
            final = update.final_state() if return_final_states else None   # before the write
            update.commit()
            return (y, final) if return_final_states else y
        # The memory-efficient path keeps only each span's input u and recomputes the block
        # (in_proj, conv, scan, norm, out_proj) in backward: the same function, no second copy.
        checkpoint = self.config.use_mem_eff_path and _recording(u, *self.parameters())
        y, state, _ = _in_spans(u, self.weights(), initial_states, seq_idx, checkpoint=checkpoint)
        return (y, state) if return_final_states else y

    def _through_cache(self, u, cache: InferenceCache, seq_idx):
        """The block from the cache's states, writing nothing: (y, _CacheUpdate). One token takes
        the constant-time recurrent step."""
        ssm, conv, w = cache.ssm_state, cache.conv_state, self.weights()
        if torch.is_grad_enabled():   # the graph keeps the states it started from: copies
            ssm, conv = ssm.clone(), conv.clone()
        if seq_idx is not None and cache.seq_id is not None:   # rows starting another segment
            ssm, conv = _continue_segments(w, ssm, conv, cache.seq_id, seq_idx)
        step = u.shape[1] == 1 and seq_idx is None
        y, new_ssm, new_conv = _in_spans(u, w, ssm, seq_idx, conv, step=step)
        return y, _CacheUpdate(cache, new_ssm, new_conv, ssm,
                               None if seq_idx is None else seq_idx[:, -1])

    def _across_ranks(self, u, seq_idx, initial_states, cache, group, final: bool):
        """The block over this rank's piece of a sequence split across `group` (section 8):
        the states the previous rank's piece leaves come in, this piece's go on to the next rank.
        Returns (y, the whole sequence's final state or None, the cache's update or None)."""
        cfg = self.config
        rank, pieces = _check_pieces(group, u, seq_idx, "u", return_final_states=final,
                                     nheads=cfg.nheads, headdim=cfg.headdim, d_state=cfg.d_state,
                                     conv_dim=cfg.conv_dim, d_conv=cfg.d_conv)
        w = self.weights()
        conv_dtype = torch.get_autocast_dtype(u.device.type) \
            if torch.is_autocast_enabled(u.device.type) else w.conv_weight.dtype
        if rank > 0:   # the state and conv window left by the pieces before this one
            shapes = [((u.shape[0], w.nheads, w.headdim, w.d_state), _compute_dtype(conv_dtype)),
                      ((u.shape[0], self.config.conv_dim, self.config.d_conv), conv_dtype)]
            state, conv, last_seq_idx = _receive_states(group, rank - 1, shapes, seq_idx,
                                                        u.device, self.layer_idx)
            if seq_idx is not None:
                state, conv = _continue_segments(w, state, conv, last_seq_idx, seq_idx)
        elif cache is not None:
            state, conv = cache.ssm_state, cache.conv_state
            if torch.is_grad_enabled():
                state, conv = state.clone(), conv.clone()
        else:
            state, conv = initial_states, None
            if state is None:
                state = self._learned_start(u.shape[0])
        checkpoint = self.config.use_mem_eff_path and _recording(u, *self.parameters())
        y, new_state, new_conv = _in_spans(u, w, state, seq_idx, conv, checkpoint=checkpoint)
        if rank < len(pieces) - 1:
            y = _send_states(y, group, rank + 1, (new_state, new_conv), seq_idx, self.layer_idx)
        whole = _from_last_rank(group, new_state) if final else None
        update = None if cache is None else _CacheUpdate(
            cache, new_state, new_conv, state, None if seq_idx is None else seq_idx[:, -1])
        return y, whole, update

    def _check_inputs(self, u, seq_idx, cu_seqlens, initial_states, cache, cp_group=None):
        cfg = self.config
        _check_tensor("u", u, (None, None, cfg.d_model), floating=True)
        b, l, _ = u.shape
        if l < 1 or b < 1:
            raise ValueError(f"u must hold at least one sequence of one token, got shape "
                             f"{tuple(u.shape)}")
        if not torch.is_autocast_enabled(u.device.type) and u.dtype != self.in_proj.weight.dtype:
            raise TypeError(f"u has dtype {u.dtype} but the layer's weights are "
                            f"{self.in_proj.weight.dtype}")
        if cu_seqlens is not None:
            if seq_idx is not None:
                raise ValueError("pass either seq_idx or cu_seqlens, not both")
            if b != 1:
                raise ValueError(f"cu_seqlens packs sequences into batch size 1, got u of batch "
                                 f"size {b}")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, l)
            if seq_idx.device != u.device:
                seq_idx = seq_idx.to(u.device)
        if seq_idx is not None:
            _check_seq_idx(seq_idx, b, l, u.device)
        shape = (b, cfg.nheads, cfg.headdim, cfg.d_state)
        if initial_states is not None:
            _check_tensor("initial_states", initial_states, shape, floating=True, device=u.device)
            wanted = (_compute_dtype(u.dtype), u.dtype)
            if initial_states.dtype not in wanted:
                raise TypeError(f"initial_states has dtype {initial_states.dtype}; the scan runs "
                                f"in {wanted[0]} (the dtype of final states) for u of dtype "
                                f"{u.dtype}: pass it in {wanted[0]} or {u.dtype}")
        if cp_group is not None:
            _check_cp_inputs(cp_group, initial_states, cu_seqlens)
            if cache is not None:
                _check_fresh_caches([cache])
        if cache is not None:
            if initial_states is not None:
                raise ValueError("pass either initial_states or a cache (whose ssm_state is the "
                                 "start), not both")
            _check_cache("cache", cache, cfg, b, self.in_proj.weight.dtype, u.device)
        elif initial_states is None:
            initial_states = self._learned_start(b)
        return seq_idx, initial_states

    def _learned_start(self, b: int) -> Optional[torch.Tensor]:
        """The learned initial state for b rows (b, h, p, n), or None (zeros) without one."""
        if not self.config.learnable_init_states:
            return None
        return self.init_states.expand(b, *self.init_states.shape)

    def allocate_inference_cache(self, batch_size: int, dtype=None, device=None) -> InferenceCache:
        """A cache for this block, on its device; it starts from init_states when learned."""
        cache = InferenceCache.alloc(batch_size, self.config,
                                     device=device or self.in_proj.weight.device,
                                     dtype=dtype or self.in_proj.weight.dtype)
        if self.config.learnable_init_states:
            start = self.init_states.detach().to(cache.ssm_state.dtype)            # (h, p, n)
            cache.initial_ssm_state = start.expand_as(cache.ssm_state)             # (b, h, p, n)
            cache.reset()
        return cache


def _check_cache(name: str, cache, cfg: Mamba2Config, b: int, dtype, device):
    """A cache this block can start from and write to: shapes, dtype, device and writability, all
    checked before anything is written."""
    if not isinstance(cache, InferenceCache):
        raise TypeError(f"{name} must be an InferenceCache (see allocate_inference_cache), got "
                        f"{type(cache).__name__}")
    _check_tensor(f"{name}.ssm_state", cache.ssm_state, (b, cfg.nheads, cfg.headdim, cfg.d_state),
                  floating=True, device=device)
    _check_tensor(f"{name}.conv_state", cache.conv_state, (b, cfg.conv_dim, cfg.d_conv),
                  floating=True, device=device)
    if cache.ssm_state.dtype != dtype or cache.conv_state.dtype != dtype:
        raise TypeError(f"{name} has dtype {cache.ssm_state.dtype}/{cache.conv_state.dtype}, the "
                        f"layer runs in {dtype}; allocate it with allocate_inference_cache")
    for part in ("ssm_state", "conv_state"):
        _check_writable(f"{name}.{part}", getattr(cache, part))
    if _shares_memory(cache.ssm_state, cache.conv_state):
        raise ValueError(f"{name}.ssm_state and {name}.conv_state share memory")
    _check_seq_id(name, cache, b, device)


def _check_seq_id(name: str, cache, b: int, device):
    if getattr(cache, "seq_id", None) is not None:
        _check_tensor(f"{name}.seq_id", cache.seq_id, (b,), device=device,
                      dtypes=(torch.int64,))


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
                                     chunk_size, initial_states=None, seq_idx=None,
                                     dt_limit=(0.0, float("inf")), return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                                     outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """The official fused path: split -> causal conv -> SSD scan -> gate/norm -> out projection.

    zxbcdt: (b, l, d_in_proj), the in_proj output laid out [z0, x0, z, xBC, dt]; conv1d_weight:
    (conv_dim, w) or (conv_dim, 1, w); A: (h,); D: (h,), (d_ssm,) or (h, headdim) — with
    headdim=None, D must be (h, headdim) and gives it, as official Mamba2 calls this with
    D_has_hdim. Returns out (b, l, d_model) — or (b, l, d_inner) without outproj_weight — and,
    with return_final_states, the final SSM state (b, h, p, n). Same arguments and meaning as
    `mamba_ssm.ops.triton.ssd_combined`.
    """
    if activation not in ("silu", "swish"):
        raise ValueError(f"activation must be 'silu' (the only one official Mamba-2 uses), "
                         f"got {activation!r}")
    w = _combined_weights(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                          dt_limit, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias,
                          headdim, ngroups, norm_before_gate)
    b, l, _ = zxbcdt.shape
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (b, w.nheads, w.headdim, w.d_state),
                      floating=True, device=zxbcdt.device)
    if seq_idx is not None:
        _check_seq_idx(seq_idx, b, l, zxbcdt.device)
    out, final_state, _ = _in_spans(zxbcdt, w, initial_states, seq_idx)
    return (out, final_state) if return_final_states else out


def _combined_weights(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, dt_limit,
                      rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                      norm_before_gate) -> BlockWeights:
    """mamba_split_conv1d_scan_combined's arguments, checked for consistent sizes, as a
    BlockWeights."""
    _check_tensor("zxbcdt", zxbcdt, (None, None, None), floating=True)
    b, l, d_in_proj = zxbcdt.shape
    if b < 1 or l < 1:
        raise ValueError(f"zxbcdt must hold at least one token, got shape {tuple(zxbcdt.shape)}")
    device = zxbcdt.device
    _check_tensor("dt_bias", dt_bias, (None,), floating=True, device=device)
    h = dt_bias.shape[0]
    if headdim is None:
        if not isinstance(D, torch.Tensor) or D.dim() != 2:
            raise TypeError("headdim is required unless D has shape (nheads, headdim)")
        headdim = D.shape[1]
    _check_int("headdim", headdim)
    _check_int("ngroups", ngroups)
    _check_int("chunk_size", chunk_size)
    _check_dt_limit(dt_limit)
    d_ssm = h * headdim
    if isinstance(conv1d_weight, torch.Tensor) and conv1d_weight.dim() == 2:
        conv1d_weight = conv1d_weight.unsqueeze(1)
    _check_tensor("conv1d_weight", conv1d_weight, (None, 1, None), floating=True, device=device)
    conv_dim = conv1d_weight.shape[0]
    rest = conv_dim - d_ssm
    if h % ngroups or rest <= 0 or rest % (2 * ngroups):
        raise ValueError(f"ngroups = {ngroups} does not fit: it must divide nheads = {h}, and the "
                         f"conv_dim = {conv_dim} channels of conv1d_weight minus d_ssm = nheads * "
                         f"headdim = {d_ssm} must be 2 * ngroups * d_state")
    d_state = rest // (2 * ngroups)
    extra = d_in_proj - (2 * d_ssm + 2 * ngroups * d_state + h)
    if extra < 0 or extra % 2:
        raise ValueError(f"zxbcdt has {d_in_proj} channels; [z0, x0, z, xBC, dt] needs 2 * d_mlp "
                         f"+ {2 * d_ssm + 2 * ngroups * d_state + h} for nheads {h}, headdim "
                         f"{headdim}, ngroups {ngroups}, d_state {d_state}")
    if conv1d_bias is not None:
        _check_tensor("conv1d_bias", conv1d_bias, (conv_dim,), floating=True, device=device)
    _check_tensor("A", A, (h,), floating=True, device=device)
    if D is not None:
        if not isinstance(D, torch.Tensor):
            raise TypeError(f"D must be a torch.Tensor or None, got {type(D).__name__}")
        if D.dim() == 1 and D.shape[0] == d_ssm and headdim > 1:
            D = D.view(h, headdim)                                         # D_has_hdim
        _check_tensor("D", D, (h,) if D.dim() <= 1 else (h, headdim), floating=True,
                      device=device)
    if rmsnorm_weight is not None:
        _check_tensor("rmsnorm_weight", rmsnorm_weight, (d_ssm,), floating=True, device=device)
        if isinstance(rmsnorm_eps, bool) or not isinstance(rmsnorm_eps, (int, float)) or \
                not 0 < rmsnorm_eps < math.inf:
            raise ValueError(f"rmsnorm_eps must be a finite number > 0, got {rmsnorm_eps!r}")
    if outproj_weight is not None:
        _check_tensor("outproj_weight", outproj_weight, (None, d_ssm + extra // 2),
                      floating=True, device=device)
        if outproj_bias is not None:
            _check_tensor("outproj_bias", outproj_bias, (outproj_weight.shape[0],),
                          floating=True, device=device)
    if not isinstance(norm_before_gate, bool):
        raise TypeError(f"norm_before_gate must be a bool, got {norm_before_gate!r}")
    return BlockWeights(conv_weight=conv1d_weight, conv_bias=conv1d_bias, dt_bias=dt_bias, A=A,
                        D=D, dt_limit=tuple(float(v) for v in dt_limit), chunk_size=chunk_size,
                        headdim=headdim, ngroups=ngroups, norm_weight=rmsnorm_weight,
                        norm_eps=rmsnorm_eps, norm_before_gate=norm_before_gate,
                        out_proj_weight=outproj_weight, out_proj_bias=outproj_bias)


# ===================================================================================== 7. attention

def rotary(x: torch.Tensor, positions: torch.Tensor, dim: int, base: float = 10000.0,
           interleaved: bool = False) -> torch.Tensor:
    """Rotary position embedding on the first `dim` channels of every head of x (b, l, heads, d)
    at integer positions (b, l): the channel pairs (i, i + dim/2) — or (2i, 2i+1) interleaved —
    turn by the angle position * base^(-2i/dim); channels past `dim` pass unchanged. As
    flash-attn's RotaryEmbedding: angles in fp32, the cos/sin table rounded to x's dtype, the
    rotation computed in fp32 (fp64 throughout for fp64 x)."""
    if dim == 0:
        return x
    cdt = _compute_dtype(x.dtype)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=x.device, dtype=cdt) / dim)
    angles = positions.to(cdt)[..., None, None] * inv_freq                  # (b, l, 1, dim/2)
    cos, sin = angles.cos().to(x.dtype).to(cdt), angles.sin().to(x.dtype).to(cdt)
    turned = x[..., :dim].to(cdt)
    x1, x2 = (turned[..., 0::2], turned[..., 1::2]) if interleaved else turned.chunk(2, dim=-1)
    o1, o2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    out = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], -1)
    return torch.cat([out.to(x.dtype), x[..., dim:]], dim=-1)


def _segment_positions(seq_idx: Optional[torch.Tensor], b: int, l: int, device,
                       offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, l) the position of each token in its segment; `offset` (b,) is added to the tokens of
    the first segment (which continues a cache)."""
    t = torch.arange(l, device=device)
    if seq_idx is None:
        pos = t.expand(b, l)
        first = torch.ones(b, l, dtype=torch.bool, device=device)
    else:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
        pos = t - torch.where(starts, t, 0).cummax(dim=1).values
        first = seq_idx == seq_idx[:, :1]
    return pos if offset is None else pos + torch.where(first, offset[:, None], 0)


def _visible(seq_idx, b, l, device, causal: bool) -> Optional[torch.Tensor]:
    """(b, l, l): which key j each query i sees: j <= i (causal) within one segment; None when
    every query sees every key (no segments, not causal)."""
    if seq_idx is None and not causal:
        return None
    vis = torch.ones(l, l, dtype=torch.bool, device=device)
    if causal:
        vis = vis.tril()
    if seq_idx is not None:
        vis = vis & (seq_idx[:, :, None] == seq_idx[:, None, :])
    return vis.expand(b, l, l)


def _finite_keys(k, v):
    """Keys and values with non-finite tokens zeroed, and which tokens those were, (b, l) (None
    when there are none). A NaN key behind a masked score would still reach every query through
    softmax(-inf) * NaN; those queries that really see it get NaN instead (the honest result)."""
    bad = ~(torch.isfinite(k).flatten(2).all(-1) & torch.isfinite(v).flatten(2).all(-1))
    if k.device.type == "cpu" and k.shape[1] > 1 and not bool(bad.any()):   # (a decoding step
        return k, v, None                                                   # never synchronises)
    keep = ~bad[..., None, None]
    return torch.where(keep, k, 0), torch.where(keep, v, 0), bad


def _attend(q, k, v, visible, scale, causal=False):
    """softmax(q kᵀ · scale) v over the keys each query sees (visible (b, lq, lk); None: all, or
    the causal ones), with the num_heads_kv heads of k and v each serving a group of q's heads
    (GQA): q (b, lq, h, dh), k and v (b, lk, h_kv, dh) -> (b, lq, h, dh)."""
    r = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                          # (b, heads, l, dh)
    if r > 1:
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    mask = None if visible is None else visible[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         is_causal=causal and mask is None)
    return out.transpose(1, 2)


def _attend_one(q, k, v, cached_k, cached_v, cached_visible, scale):
    """One new token (q, k, v (b, h or h_kv, dh)) against the cached keys and values (b, L, h_kv,
    dh) it sees (cached_visible (b, L)) and itself, reading the cache without a copy:
    softmax over [cached scores, own score], in fp32. Returns (b, h, dh)."""
    b, h, dh = q.shape
    g = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    qg = q.view(b, g, h // g, dh)
    old = torch.einsum("bgrd,blgd->bgrl", qg, cached_k).to(cdt) * scale     # (b, g, r, L)
    old = old.masked_fill(~cached_visible[:, None, None], -math.inf)
    own = (qg * k[:, :, None]).sum(-1, keepdim=True).to(cdt) * scale        # (b, g, r, 1)
    p = torch.cat([old, own], dim=-1).softmax(-1)
    out = torch.einsum("bgrl,blgd->bgrd", p[..., :-1].to(v.dtype), cached_v)
    return (out + p[..., -1:].to(v.dtype) * v[:, :, None]).reshape(b, h, dh)


class AttentionCache:
    """Per-layer decoding state of an attention layer: the keys and values so far, kv (b,
    capacity, 2, num_heads_kv, head_dim), of which the first `length` are filled; start (b,) where
    each row's current segment begins (left padding and packing: earlier keys are unseen);
    bad (b, capacity) which stored tokens were not finite (stored as zeros); and the last d_conv
    inputs of the layer's convolution, conv_state (b, qkv_dim, d_conv), when it has one. The
    buffers grow (doubling) when a call needs more than `capacity`. seq_id as InferenceCache's."""

    def __init__(self, kv, bad, start, length: int = 0, conv_state=None):
        self.kv, self.bad, self.start, self.length, self.conv_state = \
            kv, bad, start, length, conv_state
        self.seq_id: Optional[torch.Tensor] = None

    @classmethod
    def alloc(cls, batch_size: int, config: Mamba2Config, capacity: int = 256, device=None,
              dtype=None) -> "AttentionCache":
        _check_int("batch_size", batch_size)
        _check_int("capacity", capacity)
        a, kw = config.attention, dict(device=device, dtype=dtype or torch.get_default_dtype())
        kv = torch.zeros(batch_size, capacity, 2, a["num_heads_kv"], a["head_dim"], **kw)
        bad = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        start = torch.zeros(batch_size, dtype=torch.long, device=device)
        conv = None
        if a["d_conv"] > 0:
            qkv_dim = a["head_dim"] * (a["num_heads"] + 2 * a["num_heads_kv"])
            conv = torch.zeros(batch_size, qkv_dim, a["d_conv"], **kw)
        return cls(kv, bad, start, 0, conv)

    def reset(self) -> "AttentionCache":
        self.length = 0
        self.seq_id = None
        self.start.zero_()
        self.bad.zero_()
        if self.conv_state is not None:
            self.conv_state.zero_()
        return self

    @property
    def batch_size(self) -> int:
        return self.kv.shape[0]

    def state(self) -> tuple:
        """What the cache holds (for comparisons): length, start, and the filled part of kv, bad
        and the conv window."""
        return (self.length, self.start.clone(), self.kv[:, :self.length].clone(),
                self.bad[:, :self.length].clone(),
                None if self.conv_state is None else self.conv_state.clone())

    def __repr__(self) -> str:
        return (f"AttentionCache(length={self.length}, capacity={self.kv.shape[1]}, kv="
                f"{tuple(self.kv.shape)}, dtype={self.kv.dtype}, device={self.kv.device})")


class _AttentionUpdate(NamedTuple):
    """What a cached attention call appends, computed without writing; commit() writes it."""

    cache: AttentionCache
    k: torch.Tensor                          # (b, l, h_kv, dh) the new keys, finite
    v: torch.Tensor
    bad: Optional[torch.Tensor]              # (b, l) or None
    start: Optional[torch.Tensor]            # (b,) the new segment starts, or None: unchanged
    conv: Optional[torch.Tensor]             # the conv window after the call
    seq_id: Optional[torch.Tensor] = None    # (b,) the segment of the call's last token

    def commit(self):
        c, (b, l) = self.cache, self.k.shape[:2]
        end = c.length + l
        if end > c.kv.shape[1]:                                  # grow, doubling
            grown = max(end, 2 * c.kv.shape[1])
            kv = c.kv.new_zeros(b, grown, *c.kv.shape[2:])
            bad = c.bad.new_zeros(b, grown)
            kv[:, :c.length], bad[:, :c.length] = c.kv[:, :c.length], c.bad[:, :c.length]
            c.kv, c.bad = kv, bad
        c.kv[:, c.length:end, 0] = self.k.detach()
        c.kv[:, c.length:end, 1] = self.v.detach()
        c.bad[:, c.length:end] = False if self.bad is None else self.bad
        if self.start is not None:
            c.start.copy_(self.start)
        if self.conv is not None:
            c.conv_state.copy_(self.conv.detach())
        if self.seq_id is not None:
            c.seq_id = self.seq_id.to(torch.int64).clone()
        c.length = end


class MHA(nn.Module):
    """The attention layer of hybrid models (official `mamba_ssm.modules.mha.MHA`, built from
    Mamba2Config.attn_cfg at the layers of attn_layer_idx), with the official parameter names:
    in_proj -> depthwise causal conv over q, k, v (d_conv > 0) -> rotary on q and k -> attention
    (causal, grouped heads) -> out_proj, and a gated MLP that shares in_proj and out_proj
    (mlp_dim > 0)."""

    def __init__(self, config: Mamba2Config, layer_idx: Optional[int] = None, device=None,
                 dtype=None):
        super().__init__()
        a = config.attention
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_heads_kv, self.head_dim = \
            a["num_heads"], a["num_heads_kv"], a["head_dim"]
        self.mlp_dim, self.causal, self.d_conv = a["mlp_dim"], a["causal"], a["d_conv"]
        self.softmax_scale = a["softmax_scale"] or 1 / math.sqrt(self.head_dim)
        self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved = \
            a["rotary_emb_dim"], a["rotary_emb_base"], a["rotary_emb_interleaved"]
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        factory = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(config.d_model, self.qkv_dim + self.mlp_dim,
                                 bias=a["qkv_proj_bias"], **factory)
        if self.d_conv > 0:   # (always with a bias, as official)
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, self.d_conv, groups=self.qkv_dim,
                                    padding=self.d_conv - 1, **factory)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim + self.mlp_dim // 2,
                                  config.d_model, bias=a["out_proj_bias"], **factory)

    def forward(self, x: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                cache: Optional[AttentionCache] = None, cp_group=None) -> torch.Tensor:
        """x (b, l, d_model) -> (b, l, d_model); seq_idx packs segments (block-diagonal
        attention); cache: an AttentionCache to continue and to append to; cp_group: x is this
        rank's piece of a sequence split across the group (section 8)."""
        def check():
            _check_tensor("x", x, (None, None, self.config.d_model), floating=True)
            b, l, _ = x.shape
            if l < 1 or b < 1:
                raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
            if seq_idx is not None:
                _check_seq_idx(seq_idx, b, l, x.device)
            if cache is not None:
                _check_attention_cache("cache", cache, self, b, self.in_proj.weight.dtype,
                                       x.device)
        if cp_group is not None:
            _checked_on_every_rank(cp_group, check)
            y, update = self._across_ranks(x, seq_idx, cache, cp_group)
        elif cache is None:
            check()
            return self._run(x, seq_idx)[0]
        else:
            check()
            y, update = self._through_cache(x, cache, seq_idx)
        if update is not None:
            update.commit()
        return y

    def _across_ranks(self, x, seq_idx, cache, group):
        """Attention for this rank's queries over the keys of the whole sequence: the pieces'
        inputs are gathered, and the layer runs on the whole (each rank's cache gets every key).
        Returns (this piece's output, the cache's update or None)."""
        rank, lengths = _check_pieces(group, x, seq_idx, "x", qkv_dim=self.qkv_dim,
                                      d_conv=self.d_conv, causal=self.causal)
        whole = _gather_pieces(x, group, lengths)                          # (b, sum l_r, d)
        whole_seq_idx = None if seq_idx is None else \
            _gather_pieces(seq_idx.to(torch.int64), group, lengths)
        y, update = self._run(whole, whole_seq_idx, cache)
        start = sum(lengths[:rank])
        return y[:, start:start + x.shape[1]], update

    def _through_cache(self, x, cache: AttentionCache, seq_idx):
        return self._run(x, seq_idx, cache)

    def _run(self, x, seq_idx=None, cache: Optional[AttentionCache] = None):
        """(out, the cache's _AttentionUpdate or None), writing nothing."""
        b, l, _ = x.shape
        h, g, dh = self.num_heads, self.num_heads_kv, self.head_dim
        start = None if cache is None else cache.start    # (b,) where each row's segment began
        goes_on = None                                     # rows continuing the cached segment
        if cache is not None and seq_idx is not None and cache.seq_id is not None:
            goes_on = seq_idx[:, 0] == cache.seq_id        # the others start one here
            start = torch.where(goes_on, cache.start, cache.length)
        # 1. in_proj: the q, k, v columns, and the gated MLP's up and gate halves
        qkv, mlp = self.in_proj(x).split([self.qkv_dim, self.mlp_dim], dim=-1)
        # 2. a depthwise causal convolution over the q, k, v columns (no activation); the cache
        #    keeps its last d_conv inputs (official MHA keeps outputs there, #1027)
        conv = None
        if self.d_conv > 0:
            before = None if cache is None else cache.conv_state
            if goes_on is not None:
                before = torch.where(goes_on[:, None, None], before, 0)
            if before is not None and l == 1 and seq_idx is None:
                qkv, conv = _conv_step(qkv[:, 0], self.conv1d.weight, self.conv1d.bias, before)
                qkv = qkv.unsqueeze(1)
            else:
                qkv, conv = _causal_conv1d(qkv, self.conv1d.weight, self.conv1d.bias, seq_idx,
                                           before)
        q, k, v = qkv.split([h * dh, g * dh, g * dh], dim=-1)
        q, k, v = q.unflatten(-1, (h, dh)), k.unflatten(-1, (g, dh)), v.unflatten(-1, (g, dh))
        # 3. rotary embeddings at each token's position in its segment (continuing the cache's)
        offset = None if cache is None else cache.length - start                      # (b,)
        pos = _segment_positions(seq_idx, b, l, x.device, offset)
        args = (self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        q, k = rotary(q, pos, *args), rotary(k, pos, *args)
        # 4. attention: softmax(q kᵀ · scale) v within segments, causal
        k, v, bad = _finite_keys(k, v)
        out, reached = self._attention(q, k, v, bad, seq_idx, cache, start)
        if reached is not None:                          # queries that see a non-finite token
            out = torch.where(reached[..., None, None], math.nan, out)
        # 5. out_proj of [attention output, MLP output]
        y = out.reshape(b, l, h * dh)
        if self.mlp_dim:
            up, gate = mlp.chunk(2, dim=-1)
            y = torch.cat([y, up * F.silu(gate)], dim=-1)
        y = self.out_proj(y)
        update = None
        if cache is not None:
            new_start = None
            if seq_idx is not None:       # a segment starting inside the call: the keys before go
                starts = _segment_positions(seq_idx, b, l, x.device)[:, -1]        # unseen
                new_start = torch.where(seq_idx[:, -1] != seq_idx[:, 0],
                                        cache.length + l - 1 - starts, start)
            update = _AttentionUpdate(cache, k, v, bad, new_start, conv,
                                      None if seq_idx is None else seq_idx[:, -1])
        return y, update

    def _attention(self, q, k, v, bad, seq_idx, cache, start):
        """(out (b, l, h, dh), which queries see a non-finite key (b, l) or None)."""
        b, l = q.shape[:2]
        scale = self.softmax_scale
        if cache is None or cache.length == 0:
            if seq_idx is None:                        # no mask to build: SDPA's causal path
                out = _attend(q, k, v, None, scale, causal=self.causal)
                if bad is None:
                    return out, None
                seen = bad.cumsum(1) > 0 if self.causal else bad.any(1, keepdim=True).expand(b, l)
                return out, seen
            visible = _visible(seq_idx, b, l, q.device, self.causal)
            out = _attend(q, k, v, visible, scale)
            return out, None if bad is None else (visible & bad[:, None, :]).any(-1)
        L = cache.length
        seen = torch.arange(L, device=q.device) >= start[:, None]                  # (b, L)
        old_bad = cache.bad[:, :L]
        if l == 1 and seq_idx is None:                  # one token: the cache is read in place
            out = _attend_one(q[:, 0], k[:, 0], v[:, 0], cache.kv[:, :L, 0], cache.kv[:, :L, 1],
                              seen, scale)[:, None]
            reached = (old_bad & seen).any(-1, keepdim=True)
            return out, reached | bad if bad is not None else reached
        # several tokens: the cached keys are seen by the first segment of the call only
        first = torch.ones(b, l, dtype=torch.bool, device=q.device) if seq_idx is None else \
            seq_idx == seq_idx[:, :1]
        new = _visible(seq_idx, b, l, q.device, self.causal)
        if new is None:
            new = torch.ones(b, l, l, dtype=torch.bool, device=q.device)
        visible = torch.cat([first[:, :, None] & seen[:, None, :], new], dim=-1)  # (b, l, L + l)
        keys = torch.cat([cache.kv[:, :L, 0], k], dim=1)
        values = torch.cat([cache.kv[:, :L, 1], v], dim=1)
        out = _attend(q, keys, values, visible, scale)
        all_bad = torch.cat([old_bad, bad if bad is not None else old_bad.new_zeros(b, l)], 1)
        return out, (visible & all_bad[:, None, :]).any(-1)

    def allocate_inference_cache(self, batch_size: int, dtype=None, device=None,
                                 max_seqlen: int = 256) -> AttentionCache:
        return AttentionCache.alloc(batch_size, self.config, max_seqlen,
                                    device=device or self.in_proj.weight.device,
                                    dtype=dtype or self.in_proj.weight.dtype)


def _check_attention_cache(name: str, cache, mha: MHA, b: int, dtype, device):
    """An AttentionCache this layer can continue and append to, checked before anything runs."""
    if not isinstance(cache, AttentionCache):
        raise TypeError(f"{name} must be an AttentionCache (an attention layer's; see "
                        f"allocate_inference_cache), got {type(cache).__name__}")
    if not mha.causal:   # its outputs depend on later tokens: no cache can continue them
        raise ValueError(f"{name} belongs to a non-causal attention layer (attn_cfg causal=False, "
                         f"the official default), which cannot be decoded token by token or fed "
                         f"in pieces; set attn_cfg['causal'] = True for a language model")
    _check_tensor(f"{name}.kv", cache.kv, (b, None, 2, mha.num_heads_kv, mha.head_dim),
                  floating=True, device=device)
    if cache.kv.dtype != dtype:
        raise TypeError(f"{name} has dtype {cache.kv.dtype}, the layer runs in {dtype}")
    capacity = cache.kv.shape[1]
    if isinstance(cache.length, bool) or not isinstance(cache.length, int) or \
            not 0 <= cache.length <= capacity:
        raise ValueError(f"{name}.length must be an int in [0, {capacity}], got {cache.length!r}")
    _check_tensor(f"{name}.bad", cache.bad, (b, capacity), device=device, dtypes=(torch.bool,))
    _check_tensor(f"{name}.start", cache.start, (b,), device=device, dtypes=(torch.int64,))
    _check_seq_id(name, cache, b, device)
    parts = ["kv", "bad", "start"]
    if mha.d_conv > 0:
        _check_tensor(f"{name}.conv_state", cache.conv_state, (b, mha.qkv_dim, mha.d_conv),
                      floating=True, device=device)
        parts.append("conv_state")
    for part in parts:
        _check_writable(f"{name}.{part}", getattr(cache, part))


# =========================================================================== 8. context parallelism
#
# One long sequence split across the K ranks of a torch.distributed process group (cp_group):
# rank r holds the contiguous piece r (pieces in group-rank order; lengths may differ). A Mamba-2
# layer needs from the pieces before its own only what a cache holds — the SSM state (b, h, p, n)
# and the conv window (b, conv_dim, d_conv) — so rank r receives them from rank r - 1, runs the
# block on its piece from them, and sends its own on to rank r + 1: a few hundred kilobytes per
# layer whatever the length, and exact (the same hand-over as between spans). The ranks form a
# wavefront: rank r runs layer i while rank r + 1 waits for it, then both run on. In backward
# the gradients of those states travel the other way. Attention layers need every earlier key:
# their input is all-gathered (communication and attention work grow with the length there).
# Every rank of the group must make the same calls, and when one backpropagates, every one must,
# through the outputs of those calls (a rank whose loss ignores them leaves the others waiting).

def _check_cp_group(group):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("cp_group needs torch.distributed initialised (init_process_group)")
    if not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("cp_group does not contain this process (new_group returns a placeholder "
                         "to the ranks outside it): call with cp_group only on its ranks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"cp_group must be a torch.distributed ProcessGroup (e.g. "
                        f"dist.new_group(ranks) or dist.group.WORLD), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("cp_group does not contain this process")


def _check_cp_inputs(group, initial_states, cu_seqlens):
    import torch.distributed as dist
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens cannot describe one rank's piece: pass seq_idx with cp_group")
    if initial_states is not None and dist.get_rank(group) > 0:
        raise ValueError(f"initial_states belong to the first rank's piece with cp_group; this "
                         f"is rank {dist.get_rank(group)} of the group")


def _checked_on_every_rank(group, check: Callable, problem: Optional[Exception] = None,
                           **agree):
    """check()'s result. If it (or an earlier `problem`) fails on any rank of the group, every
    rank raises — this one its own error, the others a ValueError naming it — and none is left
    waiting for a message that will not come. The ints in `agree` (flags of the call) must be
    the same on every rank."""
    _check_cp_group(group)
    result = None
    if problem is None:
        try:
            result = check()
        except (ValueError, TypeError) as e:
            problem = e
    every = _gather_ints(group, torch.device("cpu"), [problem is not None, *agree.values()])
    if problem is not None:
        raise problem
    refused = [r for r, row in enumerate(every) if row[0]]
    if refused:
        raise ValueError(f"cp_group rank(s) {refused} refused their piece of this call (their "
                         f"error says why); every rank stops")
    _require_agreement(every, agree, "every rank")
    return result


def _gather_ints(group, device: torch.device, values) -> list:
    """Every rank's list of ints, one row per rank of the group."""
    import torch.distributed as dist
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64,
                        device=_comm_device(group, device))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return torch.stack(every).tolist()


def _require_agreement(rows: list, fields, whose: str):
    """rows' columns after the first, one per field, must hold one value on every rank."""
    for col, what in enumerate(fields, start=1):
        if len({row[col] for row in rows}) > 1:
            raise ValueError(f"with cp_group {whose} must agree in {what}; got "
                             f"{[row[col] for row in rows]} across the ranks")


_CP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the group's backend takes tensors: the CPU for gloo, an accelerator otherwise."""
    import torch.distributed as dist
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    if device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _check_pieces(group, x: torch.Tensor, seq_idx, name: str, **agree):
    """Every rank's (batch, length, width, packing, grad mode, dtype, autocast, and the ints in
    `agree`: layer shapes, flags) gathered: (rank, lengths). A rank whose call does not fit the
    others' makes every rank raise here, before anything is sent."""
    import torch.distributed as dist
    def code(dtype):
        return _CP_DTYPES.index(dtype) if dtype in _CP_DTYPES else -1
    device = x.device.type
    autocast = code(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else -2
    fields = {"batch size": x.shape[0], "width": x.shape[-1], "seq_idx given": seq_idx is not None,
              "grad mode": torch.is_grad_enabled(), "dtype": code(x.dtype), "autocast": autocast,
              **agree}
    every = _gather_ints(group, x.device, [x.shape[1], *fields.values()])   # (K, 1 + fields)
    _require_agreement(every, fields, f"every rank's {name}")
    return dist.get_rank(group), [row[0] for row in every]


class _SendStates(torch.autograd.Function):
    """Identity on `out`, sending `states` to global rank `dst` on the way (forward) and receiving
    their gradients from it on the way back (backward). `out` carries the send into the graph."""

    @staticmethod
    def forward(ctx, out, group, dst, tag, *states):
        import torch.distributed as dist
        for s in states:
            dist.send(s.detach().contiguous(), dst, group=group, tag=tag)
        ctx.group, ctx.dst, ctx.tag = group, dst, tag
        ctx.specs = [(s.shape, s.dtype, s.device) for s in states]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        import torch.distributed as dist
        grads = []
        for shape, dtype, device in ctx.specs:
            g = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(g, ctx.dst, group=ctx.group, tag=ctx.tag)
            grads.append(g)
        return (dout, None, None, None, *grads)


class _ReceiveStates(torch.autograd.Function):
    """The states global rank `src` sends (forward); their gradients go back to it (backward).
    `anchor` (empty, requiring grad while autograd records) puts the received states in the
    graph."""

    @staticmethod
    def forward(ctx, anchor, group, src, tag, specs):
        import torch.distributed as dist
        out = []
        for shape, dtype, device in specs:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, src, group=group, tag=tag)
            out.append(t)
        ctx.group, ctx.src, ctx.tag = group, src, tag
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        import torch.distributed as dist
        for g in grads:
            dist.send(g.contiguous(), ctx.src, group=ctx.group, tag=ctx.tag)
        return None, None, None, None, None


def _receive_states(group, src: int, shapes, seq_idx, device, tag):
    """(state, conv window, last segment id or None) from group rank `src`'s piece."""
    import torch.distributed as dist
    src, tag, cdev = dist.get_global_rank(group, src), tag or 0, _comm_device(group, device)
    last = None
    if seq_idx is not None:
        last = torch.empty(seq_idx.shape[0], dtype=torch.int64, device=cdev)
        dist.recv(last, src, group=group, tag=tag)
        last = last.to(device)
    anchor = torch.empty(0, device=cdev, requires_grad=torch.is_grad_enabled())
    state, conv = _ReceiveStates.apply(anchor, group, src, tag,
                                       [(shape, dtype, cdev) for shape, dtype in shapes])
    return state.to(device), conv.to(device), last


def _send_states(y, group, dst: int, states, seq_idx, tag):
    """y, with `states` sent to group rank `dst` (their gradients come back through y)."""
    import torch.distributed as dist
    dst, tag = dist.get_global_rank(group, dst), tag or 0
    cdev = _comm_device(group, y.device)
    if seq_idx is not None:
        dist.send(seq_idx[:, -1].to(cdev, torch.int64).contiguous(), dst, group=group, tag=tag)
    state, conv = states
    return _SendStates.apply(y, group, dst, tag, state.to(cdev), conv.to(cdev))


def _from_last_rank(group, t: torch.Tensor) -> torch.Tensor:
    """The last rank's t on every rank (a detached copy off the last rank)."""
    import torch.distributed as dist
    last = dist.get_world_size(group) - 1
    if dist.get_rank(group) == last:
        dist.broadcast(t.detach().to(_comm_device(group, t.device)).contiguous(),
                       dist.get_global_rank(group, last), group=group)
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=_comm_device(group, t.device))
    dist.broadcast(out, dist.get_global_rank(group, last), group=group)
    return out.to(t.device)


class _GatherPieces(torch.autograd.Function):
    """Every rank's piece (b, l_r, ...) joined in rank order (b, sum l_r, ...); in backward each
    piece takes the sum over the ranks of the gradient of its positions."""

    @staticmethod
    def forward(ctx, x, group, lengths):
        import torch.distributed as dist
        pad = max(lengths) - x.shape[1]
        padded = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1) if pad else x
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.lengths, ctx.rank = group, lengths, dist.get_rank(group)
        return torch.cat([p[:, :n] for p, n in zip(parts, lengths)], 1)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.lengths[:ctx.rank])
        return grad[:, start:start + ctx.lengths[ctx.rank]], None, None


def _gather_pieces(x: torch.Tensor, group, lengths) -> torch.Tensor:
    cdev = _comm_device(group, x.device)
    return _GatherPieces.apply(x.to(cdev), group, lengths).to(x.device)


def _next_tokens_across_ranks(labels: torch.Tensor, group) -> torch.Tensor:
    """The label after each row's last position (b,): the next rank's first, -100 on the last."""
    import torch.distributed as dist
    rank, k = dist.get_rank(group), dist.get_world_size(group)
    cdev = _comm_device(group, labels.device)
    tag = 1 << 20                                   # apart from the layers' tags
    if rank > 0:
        dist.send(labels[:, 0].to(cdev, torch.int64).contiguous(),
                  dist.get_global_rank(group, rank - 1), group=group, tag=tag)
    nxt = torch.full((labels.shape[0],), -100, dtype=torch.int64, device=cdev)
    if rank < k - 1:
        dist.recv(nxt, dist.get_global_rank(group, rank + 1), group=group, tag=tag)
    return nxt.to(labels.device)


# ===================================================================================== 9. the model

class GatedMLP(nn.Module):
    """Official GatedMLP: fc1 -> (y, gate) -> y * silu(gate) -> fc2; hidden rounded up to 128s."""

    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128, device=None,
                 dtype=None):
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
    """Prenorm residual block (official `Block`): add -> norm -> mixer [-> add -> norm2 -> mlp];
    the mixer is a Mamba-2 block, or attention (MHA) at the layers of config.attn_layer_idx."""

    def __init__(self, config: Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _residual_norm(config, device, dtype)
        mixer = MHA if layer_idx in config.attn_layer_idx else Mamba2
        self.mixer = mixer(config, layer_idx=layer_idx, device=device, dtype=dtype)
        if config.d_intermediate > 0:
            self.norm2 = _residual_norm(config, device, dtype)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, device=device, dtype=dtype)

    def _add_norm(self, norm, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        hidden = norm(_cast(residual, norm.weight.dtype))
        return hidden, _cast(residual, torch.float32) if self.residual_in_fp32 else residual

    def forward(self, hidden, residual=None, cache=None, seq_idx=None, pending=None,
                cp_group=None):
        """With a cache, the mixer's cache update is appended to `pending`, not written."""
        hidden, residual = self._add_norm(self.norm, hidden, residual)
        if cp_group is not None:
            if isinstance(self.mixer, MHA):
                hidden, update = self.mixer._across_ranks(hidden, seq_idx, cache, cp_group)
            else:
                hidden, _, update = self.mixer._across_ranks(hidden, seq_idx, None, cache,
                                                             cp_group, final=False)
            if update is not None:
                pending.append(update)
        elif cache is None:
            hidden = self.mixer(hidden, seq_idx=seq_idx)
        else:
            hidden, update = self.mixer._through_cache(hidden, cache, seq_idx)
            pending.append(update)
        if hasattr(self, "mlp"):
            hidden, residual = self._add_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual


class Mamba2Model(nn.Module):
    """The backbone: embedding -> n_layer blocks -> norm_f; hidden states (b, l, d_model)."""

    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device,
                                      dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layer))
        self.norm_f = _residual_norm(config, device, dtype)

    def forward(self, input_ids: torch.Tensor, cache: Optional[list] = None,
                seq_idx: Optional[torch.Tensor] = None, cp_group=None) -> torch.Tensor:
        """input_ids (b, l) -> hidden states (b, l, d_model). cp_group: input_ids is this rank's
        piece of sequences split across the group's ranks in order (section 8); with a cache
        (from fresh caches: a prefill), the last rank's cache ends as one process's would."""
        hidden, pending = self._forward(input_ids, cache, seq_idx, cp_group)
        for update in pending:                  # every layer has run: now the caches move on
            update.commit()
        return hidden

    def _forward(self, input_ids, cache, seq_idx, cp_group=None, problem=None, **agree):
        """The hidden states and the caches' updates, none of them written yet. (`problem`: a
        caller's check that failed, to be raised on every rank of cp_group; `agree`: its flags.)"""
        if cp_group is None:
            self._check_inputs(input_ids, cache, seq_idx)
        else:
            def check():
                self._check_inputs(input_ids, cache, seq_idx)
                if cache is not None:
                    _check_fresh_caches(cache)
            _checked_on_every_rank(cp_group, check, problem, cache_given=cache is not None,
                                   **agree)
        return self._run(input_ids, cache, seq_idx, cp_group)

    def _run(self, input_ids, cache, seq_idx, cp_group=None):
        """_forward without the checks (the decoding loop's step: see generate)."""
        hidden, residual, pending = self.embedding(input_ids), None, []    # (b, l, d_model)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, None if cache is None else cache[i],
                                     seq_idx, pending, cp_group)
        residual = hidden if residual is None else hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype)), pending

    def _check_inputs(self, input_ids, cache, seq_idx):
        device = self.embedding.weight.device
        _check_tensor("input_ids", input_ids, (None, None), device=device,
                      dtypes=(torch.int64, torch.int32))
        b, l = input_ids.shape
        if l < 1 or b < 1:
            raise ValueError(f"input_ids must hold at least one sequence of one token, got shape "
                             f"{tuple(input_ids.shape)}")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()                 # one host sync
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got "
                             f"values in [{lo}, {hi}]")
        if seq_idx is not None:
            _check_seq_idx(seq_idx, b, l, input_ids.device)
        if cache is None:
            return
        # every layer's cache is checked before any of them is touched
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
            got = f" of length {len(cache)}" if isinstance(cache, (list, tuple)) else ""
            raise TypeError(f"cache must be a list of {len(self.layers)} InferenceCache (see "
                            f"allocate_inference_cache), got {type(cache).__name__}{got}")
        dtype = self.embedding.weight.dtype
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mixer, MHA):
                _check_attention_cache(f"cache[{i}]", cache[i], layer.mixer, b, dtype,
                                       input_ids.device)
            else:
                _check_cache(f"cache[{i}]", cache[i], layer.mixer.config, b, dtype,
                             input_ids.device)
        tensors = [(i, t) for i, c in enumerate(cache) for t in _cache_tensors(c)]
        for k, (i, t) in enumerate(tensors):
            for j, other in tensors[k + 1:]:
                if j != i and _shares_memory(t, other):
                    raise ValueError(f"cache[{i}] and cache[{j}] share memory: each layer needs a "
                                     f"cache of its own (allocate_inference_cache)")

    def allocate_inference_cache(self, batch_size: int, dtype=None, max_seqlen: int = 256) -> list:
        """One cache per layer: InferenceCache for Mamba-2 layers, AttentionCache (room for
        max_seqlen tokens, growing beyond) for attention layers."""
        dtype = dtype or self.embedding.weight.dtype
        return [layer.mixer.allocate_inference_cache(batch_size, dtype, max_seqlen=max_seqlen)
                if isinstance(layer.mixer, MHA) else
                layer.mixer.allocate_inference_cache(batch_size, dtype) for layer in self.layers]


def _check_fresh_caches(caches):
    """With cp_group a cache can only be filled from its start (a prefill): the pieces after the
    first would otherwise need what the other ranks' caches hold."""
    for i, c in enumerate(caches):
        if isinstance(c, AttentionCache):
            fresh = c.length == 0
        else:
            start = c.initial_ssm_state
            fresh = (not c.conv_state.any() and c.seq_id is None and
                     (not c.ssm_state.any() if start is None else torch.equal(c.ssm_state, start)))
        if not fresh:
            raise ValueError(f"with cp_group the caches must be fresh (allocated, or reset()): "
                             f"a prefill across ranks starts from nothing; cache[{i}] holds state")


def _cache_tensors(cache) -> list:
    if isinstance(cache, AttentionCache):
        return [t for t in (cache.kv, cache.bad, cache.start, cache.conv_state) if t is not None]
    return [cache.ssm_state, cache.conv_state]


def _init_lm_weights(model: nn.Module, n_layer: int):
    """Official LM init: zero biases, N(0, 0.02) embeddings, the residual-out weights (out_proj,
    fc2) re-drawn and scaled by 1/sqrt(n_layer). (mamba_ssm applies its init twice, the last time
    with n_residuals_per_layer=1, so the scale is 1/sqrt(n_layer) with or without the MLP.)"""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


class Mamba2LMHeadModel(nn.Module):
    """The Mamba-2 language model, with the official structure and state-dict names."""

    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"config must be a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = Mamba2Model(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False,
                                 device=device, dtype=dtype)
        _init_lm_weights(self, config.n_layer)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def forward(self, input_ids: torch.Tensor, cache: Optional[list] = None,
                seq_idx: Optional[torch.Tensor] = None, num_last_tokens: int = 0,
                labels: Optional[torch.Tensor] = None, cp_group=None) -> torch.Tensor:
        """input_ids (b, l) -> logits (b, l or num_last_tokens, padded vocab).

        With labels (b, l) it returns the mean next-token cross-entropy instead: position t
        predicts labels[:, t+1] (shifted inside, as in transformers), labels of -100 are ignored,
        and the distribution is over the vocab_size real tokens (the vocabulary padding is never a
        target, nor sampled by generate). It is computed without the logits (_LinearCrossEntropy):
        a fraction of the memory of a loss on returned logits, at about the same speed.

        cp_group: input_ids (and labels) are this rank's piece of sequences split across the
        group (section 8); logits are this piece's (num_last_tokens: its last ones). With labels,
        every rank returns the loss of the whole sequences (a piece's last position predicts the
        next rank's first label); its gradient is this piece's share, so that the gradients
        summed over the ranks are those of the whole."""
        problem = None
        try:
            self._check_inputs(input_ids, num_last_tokens, labels)
        except (ValueError, TypeError) as e:
            if cp_group is None:
                raise
            problem = e                     # raised on every rank by the backbone's check
        hidden, pending = self.backbone._forward(input_ids, cache, seq_idx, cp_group, problem,
                                                 labels_given=labels is not None,
                                                 num_last_tokens=num_last_tokens)
        if labels is not None and cp_group is not None:
            out = self._loss_across_ranks(hidden, labels, cp_group)
        elif labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)    # (b, l): the next token, or none
            out = _LinearCrossEntropy.apply(hidden.flatten(0, 1), self.lm_head.weight,
                                            targets.flatten(), -100, self.config.vocab_size, None)
        else:
            if num_last_tokens > 0:
                hidden = hidden[:, -num_last_tokens:]              # logits only where needed
            out = self.lm_head(hidden)                             # (b, l', padded vocab)
        for update in pending:                  # the whole call has succeeded: caches move on
            update.commit()
        return out

    def _check_inputs(self, input_ids, num_last_tokens, labels):
        _check_tensor("input_ids", input_ids, (None, None), device=self.device,
                      dtypes=(torch.int64, torch.int32))
        _check_int("num_last_tokens", num_last_tokens, minimum=0)
        if num_last_tokens > input_ids.shape[1]:
            raise ValueError(f"num_last_tokens must be at most the length of input_ids "
                             f"({input_ids.shape[1]}), got {num_last_tokens}")
        if labels is not None:
            _check_labels(labels, input_ids, self.config.vocab_size)
            if num_last_tokens:
                raise ValueError(f"labels take the loss over every position; num_last_tokens "
                                 f"must be 0, got {num_last_tokens}")

    def _loss_across_ranks(self, hidden, labels, group):
        """The whole sequences' mean next-token loss on every rank, differentiable in this
        piece's share: (this piece's sum of losses) / (the whole's count of targets)."""
        import torch.distributed as dist
        nxt = _next_tokens_across_ranks(labels, group)                        # (b,)
        targets = torch.cat([labels[:, 1:], nxt[:, None].to(labels.dtype)], 1).flatten()
        cdev = _comm_device(group, labels.device)
        count = (targets != -100).sum().to(cdev, _compute_dtype(hidden.dtype))
        dist.all_reduce(count, group=group)                                    # whole's targets
        share = _LinearCrossEntropy.apply(hidden.flatten(0, 1), self.lm_head.weight, targets,
                                          -100, self.config.vocab_size, count.to(hidden.device))
        whole = share.detach().to(cdev).clone()
        dist.all_reduce(whole, group=group)
        return share + (whole.to(share.device) - share.detach())

    def _decode(self, tokens: torch.Tensor, cache: list) -> torch.Tensor:
        """One token per row (b,) through the caches -> next-token logits (b, padded vocab): the
        decoding loop's step. It checks nothing and synchronises nothing with the host — generate
        checked the caches on the prompt's call, and the tokens it samples lie in range by
        construction — and writes the caches only after every layer and the head have run."""
        hidden, pending = self.backbone._run(tokens[:, None], cache, None)   # (b, 1, d_model)
        logits = self.lm_head(hidden[:, 0])                                   # (b, padded vocab)
        for update in pending:
            update.commit()
        return logits

    def allocate_inference_cache(self, batch_size: int, dtype=None, max_seqlen: int = 256) -> list:
        """One cache per layer (see Mamba2Model.allocate_inference_cache), accepted and updated in
        place by forward(cache=...)."""
        return self.backbone.allocate_inference_cache(batch_size, dtype, max_seqlen)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], device=None, dtype=None):
        """Load a checkpoint in the mamba_ssm format (config.json + pytorch_model.bin, e.g.
        state-spaces/mamba2-130m) or the transformers format (model_type "mamba2",
        model.safetensors, maybe sharded), from a local directory or a hub id. Tensors are
        memory-mapped and converted one at a time to `device` and `dtype` (a torch.dtype or its
        name, e.g. "bfloat16"); by default the checkpoint's dtype — for a file mixing dtypes
        (state-spaces/mamba2-2.7b holds fp16 and fp32 tensors) the one most of its weights have.
        Each tensor goes from its stored dtype straight to its parameter's, so D, fp32 in a bf16
        model as official, keeps its stored fp32 value: save_pretrained -> from_pretrained is
        exact. Nothing is unpickled beyond plain tensors, and no file outside the checkpoint is
        read. A save_pretrained of the directory that was interrupted is completed first."""
        dtype, device = _as_dtype(dtype), _as_device(device)
        path = resolve_checkpoint(name_or_path)
        _finish_interrupted_save(path)
        config, fmt = read_checkpoint_config(path)
        sources, target = _checkpoint_sources(path, dtype=dtype)
        with torch.device("meta"):   # built in the weights' dtype: D is fp32 there, as official
            model = cls(config, dtype=target)
        if fmt == "transformers" and "backbone.embeddings.weight" in sources:
            sources["backbone.embedding.weight"] = sources.pop("backbone.embeddings.weight")
        expected = dict(model.state_dict())
        if config.tie_embeddings:
            sources.pop("lm_head.weight", None)   # tied: the head is the embedding (official files
            expected.pop("lm_head.weight")        # hold both)
        missing = sorted(set(expected) - set(sources))
        unexpected = sorted(set(sources) - set(expected))
        if missing or unexpected:
            more = "..." if len(missing) > 8 else ""
            extra = "..." if len(unexpected) > 8 else ""
            raise ValueError(f"checkpoint {path} does not match the model: missing tensors "
                             f"{missing[:8]}{more}, unexpected tensors {unexpected[:8]}{extra}")
        for name, source in sources.items():
            if source.shape != tuple(expected[name].shape):
                raise ValueError(f"checkpoint tensor {name} has shape {source.shape}, the config "
                                 f"implies {tuple(expected[name].shape)}")
        # one conversion per tensor, stored dtype -> the parameter's: never through a narrower one
        tensors = {name: source.read(device, expected[name].dtype)
                   for name, source in sources.items()}
        model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()
        return model.eval()

    def save_pretrained(self, directory: Union[str, os.PathLike], format: str = "mamba_ssm",
                        max_shard_size: Union[int, str] = "5GB"):
        """Write a checkpoint that from_pretrained reads back exactly, atomically: every file is
        written under a temporary name in `directory` and synced; then a journal listing the
        renames and removals still to do is committed, they are done and the journal removed. A
        failure before the commit (a full disk, say) leaves the earlier checkpoint as it was; one
        after it is completed by the next from_pretrained or save_pretrained of `directory`.
        Either way that reads exactly the earlier checkpoint or exactly this one, never a mix.

        format="mamba_ssm" (default): what the official code reads — config.json with the official
        keys only (MambaConfig(**json) accepts it) and pytorch_model.bin, plus model.safetensors.
        format="transformers": config.json + model.safetensors (sharded above max_shard_size, with
        model.safetensors.index.json) for transformers.Mamba2ForCausalLM.from_pretrained.
        format="full": every Mamba2Config field (read by this library only) + model.safetensors.
        A setting a format cannot express is refused before anything is written. Weight files of
        an earlier checkpoint in `directory` (model.safetensors, pytorch_model.bin, their index
        files, and the shards an index names that are called as shards are,
        model-00001-of-00002.safetensors) are removed; other files are never touched."""
        formats = ("mamba_ssm", "transformers", "full")
        if format not in formats:
            raise ValueError(f"format must be one of {formats}, got {format!r}")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or path, got {type(directory).__name__}")
        directory = Path(directory).expanduser()
        _check_directory_can_be(directory)
        state = _state_to_save(self)
        if format == "transformers":
            config = config_to_transformers(self.config, self.dtype)
            state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
                     for k, v in state.items() if not (self.config.tie_embeddings and
                                                       k == "lm_head.weight")}
            files = _safetensors_files(state, _byte_count(max_shard_size))
        else:
            config = config_to_mamba_ssm(self.config, official=format == "mamba_ssm")
            lean = {k: v for k, v in state.items()
                    if not (self.config.tie_embeddings and k == "lm_head.weight")}
            files = _safetensors_files(lean, None)
            if format == "mamba_ssm":   # the official file: every tensor, the tied head included
                files["pytorch_model.bin"] = functools.partial(torch.save, state)
        files["config.json"] = _json_writer(config)
        _write_checkpoint(directory, files)


    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20,
                 attention_mask: Optional[torch.Tensor] = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id=None,
                 generator: Optional[torch.Generator] = None, streamer=None,
                 cuda_graph: bool = False, compile: bool = False) -> torch.LongTensor:
        """Prompt (b, l) -> (b, l + new) tokens, with transformers' meanings; see `generate`."""
        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature,
                        top_k, top_p, min_p, repetition_penalty, eos_token_id, pad_token_id,
                        generator, streamer, cuda_graph, compile)


class Mamba2ForSequenceClassification(nn.Module):
    """Backbone + a linear score head pooled at each row's last real token (padding on either side
    is ignored)."""

    def __init__(self, config: Mamba2Config, num_labels: int = 2, device=None, dtype=None):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.backbone = Mamba2Model(config, device=device, dtype=dtype)
        self.score = nn.Linear(config.d_model, num_labels, bias=False, device=device, dtype=dtype)
        _init_lm_weights(self, config.n_layer)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, l), attention_mask (b, l) holding one run of 1s per row -> logits
        (b, num_labels)."""
        seq_idx = None
        if attention_mask is not None:
            mask = _check_attention_mask(attention_mask, input_ids, contiguous_only=True)
            # segments: the pads before, the real run, the pads after; the run sees no padding
            seq_idx = F.pad((mask[:, 1:] != mask[:, :-1]).int().cumsum(1), (1, 0)).int()   # (b, l)
        hidden = self.backbone(input_ids, seq_idx=seq_idx)                    # (b, l, d)
        if attention_mask is None:
            pooled = hidden[:, -1]
        else:
            b, l = mask.shape
            last = l - 1 - mask.flip(1).int().argmax(1)                      # (b,) last real token
            pooled = hidden[torch.arange(b, device=hidden.device), last]     # (b, d)
        return self.score(pooled)                                            # (b, num_labels)


def _check_labels(labels, input_ids, vocab_size: int):
    _check_tensor("labels", labels, tuple(input_ids.shape), device=input_ids.device,
                  dtypes=(torch.int64, torch.int32))
    if (((labels < 0) & (labels != -100)) | (labels >= vocab_size)).any():
        raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}) or be -100 (ignored)")


def _check_attention_mask(attention_mask, input_ids, contiguous_only=False, left_only=False):
    """Validate a 0/1 mask of input_ids' shape; with left_only, left padding (0..0 1..1)."""
    _check_tensor("input_ids", input_ids, (None, None), floating=False)
    _check_tensor("attention_mask", attention_mask, tuple(input_ids.shape), device=input_ids.device)
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.bool()
    if not mask.any(1).all():
        raise ValueError("attention_mask has a row with no real token")
    if left_only and (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ValueError("attention_mask must be left padding (each row 0...0 1...1); pad prompts "
                         "on the left")
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]               # (b,) runs of 1s
    if contiguous_only and (runs != 1).any():
        raise ValueError("attention_mask must hold one contiguous run of 1s per row (left or right "
                         "padding)")
    return mask


# =============================================================================== 10. the fused loss

# Tokens per chunk of the fused loss: at most 2^25 logits (128 MB in fp32) exist at a time.
LOSS_CHUNK_LOGITS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden @ weight[:vocab]ᵀ against targets, chunk by chunk
    over tokens, never holding the (tokens, vocab) logits: each chunk's softmax becomes its own
    gradient in place (softmax - one-hot), and the gradients of hidden and weight are accumulated at
    once, so that backward only scales them. Same value and gradients as F.cross_entropy(hidden @
    weight[:vocab]ᵀ, targets, ignore_index=...), with 3 of its 5 passes over the logits and a
    fraction of the memory. Rows of weight past `vocab` (vocabulary padding) get zero gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, vocab, count=None):
        n, full, hidden_in, hidden_dtype = hidden.shape[0], weight, hidden, hidden.dtype
        cdt = _compute_dtype(weight.dtype)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):   # products in the autocast dtype, as lm_head's
            low = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(low), weight.to(low)
        weight = weight[:vocab]                                               # (vocab, d) real
        valid = targets != ignore_index                                       # (n,)
        # the mean over the valid targets, or the sum over `count` (a whole split across ranks)
        scale = 1.0 / (valid.sum() if count is None else count).to(cdt)
        grads = any(ctx.needs_input_grad[:2])
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(full.shape, dtype=cdt, device=full.device) \
            if ctx.needs_input_grad[1] else None
        chunk = max(1, LOSS_CHUNK_LOGITS // vocab)
        buffer = hidden.new_empty(min(chunk, n), vocab)                       # reused
        total = hidden.new_zeros((), dtype=cdt)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t, v = targets[start:start + chunk], valid[start:start + chunk]
            logits = torch.matmul(h, weight.t(), out=buffer[:len(h)]).to(cdt)   # (chunk, vocab)
            lse = torch.logsumexp(logits, -1)                                    # (chunk,)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)    # target logit
            total += ((lse - picked) * v).sum()
            if grads:   # d(loss)/d(logits) = (softmax - one-hot) / count, built in place
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -v.to(cdt).unsqueeze(1))
                g.mul_((v * scale).unsqueeze(1))
                if dweight is not None:
                    dweight[:vocab].addmm_(g.t(), h.to(cdt))
                if dhidden is not None:
                    torch.matmul(g.to(weight.dtype), weight, out=dhidden[start:start + chunk])
        ctx.save_for_backward(None if dhidden is None else dhidden.to(hidden_dtype), dweight,
                              hidden_in, full, targets)
        ctx.weight_dtype, ctx.ignore_index, ctx.vocab = full.dtype, ignore_index, vocab
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx, dloss):
        dhidden, dweight, hidden, weight, targets = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph: the loss re-run on the logits, recorded
            logits = (hidden @ weight[:ctx.vocab].t()).to(_compute_dtype(weight.dtype))
            loss = F.cross_entropy(logits, targets, ignore_index=ctx.ignore_index,
                                   reduction="sum") * ctx.scale
            return _grad_of_recorded((loss,), (dloss,), (hidden, weight),
                                     ctx.needs_input_grad) + (None, None, None, None)
        dhidden = None if dhidden is None else dhidden * dloss.to(dhidden.dtype)
        dweight = None if dweight is None else (dweight * dloss).to(ctx.weight_dtype)
        return dhidden, dweight, None, None, None, None


# ================================================================================== 11. checkpoints

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(name_or_path) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (config, weights, tokenizer) into the
    hub cache."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"checkpoint {str(path)!r} is a file; expected a directory holding "
                         f"config.json and weights")
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise ValueError(f"checkpoint directory {name!r} does not exist (and is not a hub id like "
                         f"'state-spaces/mamba2-130m')")
    try:
        from huggingface_hub import snapshot_download
        patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no huggingface_hub: one clear message
        raise ValueError(f"{name!r} is not a local directory and could not be fetched from the hub "
                         f"({type(e).__name__}: {e})") from e


def _inside_checkpoint(directory: Path, name: str) -> Path:
    """directory / name, refused unless it resolves inside the checkpoint: the directory itself,
    or for a hub snapshot (…/snapshots/<revision>/) the repository's blobs/ its files link to."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f"checkpoint {str(directory)!r} names a weight file {name!r}: only "
                         f"relative names inside the checkpoint are read")
    file = directory / name
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    target = file.resolve()
    if not any(target == root or root in target.parents for root in roots):
        raise ValueError(f"refusing to read {file}: it resolves to {target}, outside the "
                         f"checkpoint directory")
    return file


# transformers' Mamba2Config names and defaults (transformers 5), and ours for each
_TRANSFORMERS_KEYS = {
    "hidden_size": ("d_model", None), "num_hidden_layers": ("n_layer", 64),
    "state_size": ("d_state", 128), "head_dim": ("headdim", 64), "n_groups": ("ngroups", 8),
    "expand": ("expand", 2), "conv_kernel": ("d_conv", 4), "chunk_size": ("chunk_size", 256),
    "time_step_limit": ("dt_limit", (0.0, math.inf)), "use_bias": ("bias", False),
    "use_conv_bias": ("conv_bias", True), "residual_in_fp32": ("residual_in_fp32", True),
    "tie_word_embeddings": ("tie_embeddings", False), "layer_norm_epsilon": ("norm_epsilon", 1e-5),
    "vocab_size": ("vocab_size", 32768), "time_step_min": ("dt_min", 0.001),
    "time_step_max": ("dt_max", 0.1), "time_step_floor": ("dt_init_floor", 1e-4),
}
_FIELDS = [f.name for f in fields(Mamba2Config)]
_BLOCK_FIELDS = _FIELDS[:_FIELDS.index("learnable_init_states") + 1]   # d_model .. learnable_init
# MambaConfig's fields (mamba_ssm.models.config_mamba), and the ones Mamba2Config holds as they are
_MAMBA_CONFIG_KEYS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                      "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                      "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
_LM_KEYS = ("d_model", "n_layer", "d_intermediate", "vocab_size", "pad_vocab_size_multiple",
            "tie_embeddings", "residual_in_fp32", "rms_norm")


def read_checkpoint_config(path: Path):
    """config.json -> (Mamba2Config, 'mamba_ssm' | 'transformers'), read as the official code or
    transformers reads it (their defaults for missing keys). Errors name the file and the key."""
    file = _inside_checkpoint(Path(path), "config.json")
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no config.json")
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(raw).__name__}")
    try:
        if raw.get("model_type") == "mamba2":
            return _config_from_transformers(raw), "transformers"
        if "d_model" in raw and "n_layer" in raw:
            return _config_from_mamba_ssm(raw), "mamba_ssm"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e
    raise ValueError(f"{file}: unknown checkpoint format (expected mamba_ssm keys d_model/n_layer/"
                     f"ssm_cfg or transformers model_type 'mamba2', got keys {sorted(raw)[:12]})")


def _config_from_transformers(raw: dict) -> Mamba2Config:
    if "hidden_size" not in raw:
        raise ValueError("a transformers Mamba-2 config needs the key 'hidden_size'")
    kw = {ours: raw.get(theirs, default) for theirs, (ours, default) in _TRANSFORMERS_KEYS.items()}
    limit = kw["dt_limit"]   # transformers 5 writes infinity as {"__float__": "Infinity"}
    if not isinstance(limit, (list, tuple)) or len(limit) != 2 or any(v is None for v in limit):
        raise ValueError(f"key 'time_step_limit' must be a pair of numbers, got {limit!r}")
    kw["dt_limit"] = [float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v
                      for v in limit]
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"key 'hidden_act' is {raw['hidden_act']!r}; Mamba-2 uses silu")
    d_inner = kw["expand"] * kw["d_model"] if all(
        isinstance(kw[k], int) for k in ("expand", "d_model")) else None
    heads = raw.get("num_heads", 128)
    if d_inner is not None and isinstance(heads, int) and isinstance(kw["headdim"], int) and \
            heads * kw["headdim"] != d_inner:
        raise ValueError(f"keys 'num_heads' * 'head_dim' ({heads} * {kw['headdim']}) must equal "
                         f"'expand' * 'hidden_size' ({d_inner})")
    if kw["norm_epsilon"] != 1e-5:   # transformers' gated norm takes it too; the block's is 1e-5
        raise ValueError(f"key 'layer_norm_epsilon' = {kw['norm_epsilon']!r}: transformers uses "
                         f"it in each block's gated norm too, which here is 1e-5 as official")
    # transformers never pads the vocabulary and always gates before normalising
    return Mamba2Config(**kw, pad_vocab_size_multiple=1, norm_before_gate=False)


def _config_from_mamba_ssm(raw: dict) -> Mamba2Config:
    known = set(_MAMBA_CONFIG_KEYS) | {"norm_epsilon"}    # norm_epsilon: format="full"
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (MambaConfig has {list(_MAMBA_CONFIG_KEYS)})")
    ssm_cfg = raw.get("ssm_cfg", {})
    if not isinstance(ssm_cfg, dict):
        raise ValueError(f"key 'ssm_cfg' must be an object, got {ssm_cfg!r}")
    ssm_cfg = dict(ssm_cfg)
    layer = ssm_cfg.pop("layer", None)
    if layer != "Mamba2":
        what = "has no 'layer', which the official code reads as Mamba1" if layer is None else \
            f"'layer' is {layer!r}"
        raise ValueError(f"key 'ssm_cfg' {what}; this library implements Mamba2 only")
    unknown = sorted(set(ssm_cfg) - set(_BLOCK_FIELDS[1:]))
    if unknown:
        raise ValueError(f"unknown ssm_cfg fields {unknown}")
    kw = {k: raw[k] for k in _LM_KEYS + ("attn_layer_idx", "attn_cfg") if k in raw}
    kw.setdefault("pad_vocab_size_multiple", 8)                # MambaConfig's default
    if "norm_epsilon" in raw:
        kw["norm_epsilon"] = raw["norm_epsilon"]
    return Mamba2Config(**kw, **ssm_cfg)


def config_to_mamba_ssm(config: Mamba2Config, official: bool = True) -> dict:
    """Mamba2Config -> config.json in the mamba_ssm layout (block fields that differ from their
    defaults go to ssm_cfg). official=True writes MambaConfig's keys only and refuses what the
    official code cannot express; official=False keeps every field (format="full")."""
    if official:
        if config.learnable_init_states:
            raise ValueError("learnable_init_states cannot be expressed in the official mamba_ssm "
                             "format (its Mamba2 has no such option); save with format='full'")
        if config.norm_epsilon != 1e-5:
            raise ValueError(f"norm_epsilon = {config.norm_epsilon} cannot be expressed in the "
                             f"official mamba_ssm format (it fixes 1e-5); save with format='full'")
    defaults = {f.name: f.default for f in fields(Mamba2Config)}
    ssm_cfg = {"layer": "Mamba2"}
    for name in _BLOCK_FIELDS[1:]:
        value = getattr(config, name)
        if name == "d_ssm" and value == config.d_inner:
            continue
        if value != defaults[name]:
            ssm_cfg[name] = list(value) if isinstance(value, tuple) else value
    out = {k: getattr(config, k) for k in _LM_KEYS}
    out.update(ssm_cfg=ssm_cfg, attn_layer_idx=list(config.attn_layer_idx),
               attn_cfg=dict(config.attn_cfg), fused_add_norm=True)
    if not official:
        out["norm_epsilon"] = config.norm_epsilon
    return {k: out[k] for k in _MAMBA_CONFIG_KEYS + (() if official else ("norm_epsilon",))}


def config_to_transformers(config: Mamba2Config, dtype: torch.dtype) -> dict:
    """Mamba2Config -> a transformers Mamba2Config dict; what transformers' Mamba2 cannot express
    (its block has no MLP branch, no per-channel D, gates before its grouped norm) is refused."""
    cannot = [("d_ssm < d_inner", config.d_ssm != config.d_inner),
              ("norm_before_gate=True", config.norm_before_gate),
              ("rmsnorm=False", not config.rmsnorm), ("D_has_hdim=True", config.D_has_hdim),
              ("rms_norm=False (LayerNorm)", not config.rms_norm),
              ("d_intermediate > 0 (a GatedMLP)", config.d_intermediate > 0),
              ("attention layers (attn_layer_idx)", bool(config.attn_layer_idx)),
              ("learnable_init_states=True", config.learnable_init_states),
              (f"norm_epsilon = {config.norm_epsilon} (its gated norm would use it too)",
               config.norm_epsilon != 1e-5)]
    refused = [what for what, bad in cannot if bad]
    if refused:
        raise ValueError(f"transformers' Mamba2 cannot express {', '.join(refused)}; save with "
                         f"format='mamba_ssm' or 'full'")
    return dict(
        model_type="mamba2", architectures=["Mamba2ForCausalLM"], hidden_size=config.d_model,
        num_hidden_layers=config.n_layer, state_size=config.d_state, head_dim=config.headdim,
        num_heads=config.nheads, n_groups=config.ngroups, expand=config.expand,
        conv_kernel=config.d_conv, chunk_size=config.chunk_size,
        time_step_limit=list(config.dt_limit), time_step_min=config.dt_min,
        time_step_max=config.dt_max, time_step_floor=config.dt_init_floor, use_bias=config.bias,
        use_conv_bias=config.conv_bias, residual_in_fp32=config.residual_in_fp32,
        tie_word_embeddings=config.tie_embeddings, layer_norm_epsilon=config.norm_epsilon,
        vocab_size=config.padded_vocab_size, hidden_act="silu",
        dtype=str(dtype).removeprefix("torch."))


_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")   # in the order they are read


def _weight_files(path: Path) -> list:
    """The weight files of a checkpoint directory, each inside it (see _inside_checkpoint)."""
    found = next((name for name in _WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        raise ValueError(f"checkpoint {str(path)!r} has no weights (looked for "
                         f"{', '.join(_WEIGHT_FILES)})")
    if not found.endswith(".index.json"):
        return [_inside_checkpoint(path, found)]
    index = _inside_checkpoint(path, found)
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        shards = sorted(set(weight_map.values()), key=str)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid shard index: {e}") from e
    return [_inside_checkpoint(path, shard) for shard in shards]


def load_checkpoint_tensors(path: Path, device=None, dtype=None) -> dict:
    """All weight tensors of a checkpoint directory, memory-mapped where the format allows,
    unpickling nothing but tensors, each converted to `device` and `dtype` as it is read (so a
    checkpoint is never held twice). dtype=None: the floating dtype most of the weights have
    (from_pretrained instead converts each tensor to the dtype of its parameter). A tensor
    stored in two shards, or a non-floating tensor, is an error naming it."""
    _finish_interrupted_save(Path(path))
    sources, target = _checkpoint_sources(path, dtype=dtype)
    return {name: source.read(device, target) for name, source in sources.items()}


class _StoredTensor(NamedTuple):
    """One tensor of a weight file as stored, not read yet."""
    file: Path
    dtype: torch.dtype
    shape: tuple
    load: Callable

    def read(self, device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor on `device` in `dtype`, converted once from its stored dtype. copy=True:
        a tensor of its own, aligned as the allocator aligns it, rather than a view into the
        file's mapping (whose offsets change BLAS kernels, and so the last bits of results)."""
        return self.load().to(device=device, dtype=dtype, copy=True)


def _checkpoint_sources(path: Path, dtype: Optional[torch.dtype] = None):
    """({name: _StoredTensor} of a checkpoint directory, nothing read yet; the dtype to build
    the model in: `dtype`, by default the floating dtype most of the weights have)."""
    sources = {}
    for file in _weight_files(Path(path)):
        for name, stored in _lazy_tensors(file).items():
            if name in sources:
                raise ValueError(f"tensor {name!r} is stored twice: in {sources[name].file.name} "
                                 f"and in {file.name}")
            sources[name] = stored
    counts = {}
    for name, stored in sources.items():
        if not stored.dtype.is_floating_point:
            raise ValueError(f"{stored.file}: tensor {name!r} has dtype {stored.dtype}; the "
                             f"weights of a Mamba-2 checkpoint are floating point")
        counts[stored.dtype] = counts.get(stored.dtype, 0) + math.prod(stored.shape)
    target = dtype or max(counts, key=counts.get, default=torch.float32)
    return sources, target


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _lazy_tensors(file: Path) -> dict:
    """{name: _StoredTensor} for one weight file, nothing materialised yet."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            handle = safe_open(str(file), framework="pt")
            out = {}
            for k in handle.keys():
                part = handle.get_slice(k)
                out[k] = _StoredTensor(file, _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8),
                                       tuple(part.get_shape()),
                                       functools.partial(handle.get_tensor, k))
            return out
        # legacy (non-zip) torch.save files cannot be memory-mapped; weights_only runs no code
        state = torch.load(str(file), map_location="cpu", mmap=zipfile.is_zipfile(file),
                           weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise ValueError(f"refusing to load {file}: it holds more than plain tensors "
                             f"(arbitrary pickled objects are never executed)") from e
        raise ValueError(f"cannot read weight file {file} (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {k: _StoredTensor(file, v.dtype, tuple(v.shape), lambda v=v: v)
            for k, v in state.items()}


def _as_dtype(dtype) -> Optional[torch.dtype]:
    """None, a floating torch.dtype, or its name ("bfloat16", "float16", "float32", ...)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None),
                                             torch.dtype):
        return _as_dtype(getattr(torch, dtype.removeprefix("torch.")))
    raise TypeError(f"dtype must be None, a floating torch.dtype or its name (e.g. 'bfloat16'), "
                    f"got {dtype!r}")


def _as_device(device) -> torch.device:
    """A torch.device that exists here (default: the CPU)."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"device {str(device)!r} is not available here: {e}") from e
    return device


def _state_to_save(model: nn.Module) -> dict:
    """The state dict, detached and contiguous, checked to be savable before anything is
    written; tensors that share memory without the config tying them (a hand-tied head) are
    copied, since safetensors refuses shared tensors."""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"cannot save: tensor {name} is on the meta device (the model has no "
                             f"weights yet)")
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        tied = getattr(model, "config", None) is not None and model.config.tie_embeddings and \
            name == "lm_head.weight"
        state[name] = t.clone() if key in seen and not tied else t
        seen.setdefault(key, name)
    return state


def _byte_count(size: Union[int, str]) -> int:
    units = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30}
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper()) \
        if isinstance(size, str) else None
    if not match:
        raise ValueError(f"max_shard_size must be a positive int of bytes or a size like '5GB', "
                         f"got {size!r}")
    return int(float(match.group(1)) * units[match.group(2)])


def _safetensors_files(state: dict, max_bytes: Optional[int]) -> dict:
    """{file name: writer(path)}: model.safetensors, or shards named as transformers names them
    plus model.safetensors.index.json when the tensors exceed max_bytes."""
    from safetensors.torch import save_file

    def writer(part):
        return lambda path: save_file(part, str(path), metadata={"format": "pt"})

    shards, size = [{}], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        return {"model.safetensors": writer(shards[0])}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
    files = {name: writer(part) for name, part in zip(names, shards)}
    files["model.safetensors.index.json"] = _json_writer(index)
    return files


def _json_writer(obj):
    text = json.dumps(obj, indent=2) + "\n"
    return lambda path: path.write_text(text, encoding="utf-8")


def _check_directory_can_be(directory: Path):
    """A ValueError naming `directory` unless it is a directory or can be created as one."""
    for p in (directory, *directory.parents):
        if p.is_symlink() or p.exists():
            if p.is_dir():
                return
            if p == directory:
                raise ValueError(f"directory {str(directory)!r} exists and is not a directory")
            raise ValueError(f"directory {str(directory)!r} cannot be created: {str(p)!r} is a "
                             f"file, not a directory")


# save_pretrained's journal: the renames and removals a committed save still has to do (see
# _write_checkpoint). Not *.json, so that hub downloads (resolve_checkpoint) never fetch one.
_JOURNAL = ".save_pretrained.journal"
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors|pytorch_model-\d{5,}-of-\d{5,}\.bin")
_TEMP_NAME = re.compile(r"\.(.+)\.\d+\.tmp")     # .<final name>.<pid>.tmp


def _is_weight_file_name(name) -> bool:
    """Whether save_pretrained may remove a file of this name: a plain name (inside the
    directory) of a weight file — a standard one, an index, or a shard named as transformers
    names them (model-00001-of-00002.safetensors, pytorch_model-00001-of-00002.bin)."""
    return isinstance(name, str) and (name in _WEIGHT_FILES or bool(_SHARD_NAME.fullmatch(name)))


def _is_file_or_link(p: Path) -> bool:
    return p.is_symlink() or p.is_file()


def _stale_weight_files(directory: Path) -> set:
    """The weight files of the checkpoint in `directory`: the standard names, and the shards an
    index names (only those named as shards are, inside the directory) — never anything else."""
    stale = set()
    for name in _WEIGHT_FILES:
        if not _is_file_or_link(directory / name):
            continue
        stale.add(name)
        if name.endswith(".index.json"):
            try:
                shards = json.loads((directory / name).read_bytes().decode("utf-8"))["weight_map"]
                shards = list(shards.values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue                                   # a broken index: only itself goes
            stale |= {s for s in shards if _is_weight_file_name(s) and
                      _is_file_or_link(directory / s)}
    return stale


def _journal_steps(names, stale: set, temps: dict) -> list:
    """The steps of a save, in an order that also keeps readers that know nothing of journals
    (transformers, older versions) from mixing checkpoints where it can: the old indexes that no
    new one replaces first (an index is read before the other files, so a stale one would shadow
    the new weights), then the new shards, indexes, single files, config.json last, then the
    other old files. No name is both removed and renamed into place, so that each step can be
    repeated, even by two processes completing the same journal."""
    def rank(name):
        return (name == "config.json", name.endswith(".index.json") or name in _WEIGHT_FILES)
    stale = stale - set(names)
    indexes = sorted(n for n in stale if n.endswith(".index.json"))
    return [["remove", n] for n in indexes] + \
        [["replace", temps[n].name, n] for n in sorted(names, key=rank)] + \
        [["remove", n] for n in sorted(stale - set(indexes))]


def _valid_step(step) -> bool:
    if not isinstance(step, list) or not step or step[0] not in ("replace", "remove"):
        return False
    if step[0] == "remove":
        return len(step) == 2 and _is_weight_file_name(step[1])
    if len(step) != 3 or not all(isinstance(s, str) for s in step):
        return False
    temp = _TEMP_NAME.fullmatch(step[1])
    return temp is not None and temp.group(1) == step[2] and \
        (step[2] == "config.json" or _is_weight_file_name(step[2]))


def _read_journal(directory: Path) -> Optional[list]:
    """The steps of the journal in `directory`, None when there is none."""
    file = directory / _JOURNAL
    if not (file.is_symlink() or file.exists()):
        return None
    problem = None
    try:
        steps = json.loads(file.read_bytes().decode("utf-8"))["steps"]
        if not isinstance(steps, list) or not all(_valid_step(s) for s in steps):
            problem = "its steps are not renames of temporary files into place or removals of " \
                      "weight files"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ValueError(f"{file} is not a valid save_pretrained journal ({problem}); unless a "
                         f"save_pretrained is still running, remove it and check the checkpoint")
    return steps


def _run_journal(directory: Path, steps: list) -> bool:
    """Do the steps that are not done yet, in order, so that repeating a journal is harmless: a
    rename whose temporary file is still there, a removal of a file still there (a journal never
    removes a name it renames into place). Whether any was to do."""
    targets = {s[2] for s in steps if s[0] == "replace"}
    todo = [s for s in steps if _is_file_or_link(directory / s[1]) and
            not (s[0] == "remove" and s[1] in targets)]
    for step in todo:
        try:
            if step[0] == "replace":
                os.replace(directory / step[1], directory / step[2])
            else:
                os.unlink(directory / step[1])
        except FileNotFoundError:        # done meanwhile (another process completing it too)
            pass
    if todo:
        _sync_directory(directory)
    return bool(todo)


def _finish_interrupted_save(directory: Path, must_remove_journal: bool = False):
    """Complete a save_pretrained of `directory` that was interrupted after its commit, so that
    the directory holds exactly the checkpoint that save wrote; an error when it cannot be."""
    steps = _read_journal(directory)
    if steps is None:
        return
    try:
        _run_journal(directory, steps)
    except OSError as e:
        raise ValueError(f"checkpoint {str(directory)!r} holds an interrupted save_pretrained "
                         f"that must be completed before the checkpoint is read or replaced, and "
                         f"completing it failed ({type(e).__name__}: {e}); load it once with "
                         f"write access to the directory") from e
    try:
        os.unlink(directory / _JOURNAL)
    except FileNotFoundError:
        pass
    except OSError:                       # every step is done: a leftover journal is harmless
        if must_remove_journal:
            raise


def _sync_directory(directory: Path):
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_synced(path: Path, write: Callable):
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _journal_is(file: Path, steps: list) -> bool:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))["steps"] == steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_checkpoint(directory: Path, files: dict):
    """Write {name: writer(path)} into directory atomically, in place of the earlier checkpoint's
    weight files (_stale_weight_files; other files are never touched). Every file is written
    under a temporary name and synced. The commit: a journal of the renames into place and the
    removals still to do (_journal_steps), written the same way and renamed into place. Then
    the steps are done and the journal removed. A failure before the commit removes the
    temporary files and leaves the earlier checkpoint as it was; after it, the journal stays,
    and the next from_pretrained or save_pretrained of the directory completes it (each step
    done at most once, whatever interrupted it) before anything else."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"directory {str(directory)!r} cannot be created: {e}") from e
    _finish_interrupted_save(directory, must_remove_journal=True)
    stale = _stale_weight_files(directory)
    temps = {name: directory / f".{name}.{os.getpid()}.tmp" for name in files}
    steps = _journal_steps(list(files), stale, temps)
    journal, journal_temp = directory / _JOURNAL, directory / f"{_JOURNAL}.{os.getpid()}.tmp"
    try:
        for name, write in files.items():
            _write_synced(temps[name], write)
        _write_synced(journal_temp, _json_writer({"steps": steps}))
        _sync_directory(directory)
        os.replace(journal_temp, journal)                                 # the commit
    except BaseException:
        if not _journal_is(journal, steps):      # not committed: the earlier checkpoint stays
            for tmp in [*temps.values(), journal_temp]:
                try:
                    tmp.unlink()
                except OSError:
                    pass
        raise
    try:
        _sync_directory(directory)
        _run_journal(directory, steps)
        try:
            os.unlink(journal)
        except FileNotFoundError:          # a reader completed the journal meanwhile
            pass
    except BaseException as e:
        if hasattr(e, "add_note"):
            e.add_note(f"save_pretrained was interrupted after its commit: the next "
                       f"from_pretrained or save_pretrained of {str(directory)!r} completes it")
        raise


# =================================================================================== 12. generation

def _check_generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty):
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = [
        ("max_new_tokens", max_new_tokens, is_int(max_new_tokens) and max_new_tokens >= 0,
         "an int >= 0"),
        ("temperature", temperature, is_number(temperature) and temperature >= 0, "a number >= 0"),
        ("top_k", top_k, is_int(top_k) and top_k >= 0, "an int >= 0"),
        ("top_p", top_p, is_number(top_p) and 0 < top_p <= 1, "a number in (0, 1]"),
        ("min_p", min_p, is_number(min_p) and 0 <= min_p <= 1, "a number in [0, 1]"),
        ("repetition_penalty", repetition_penalty,
         is_number(repetition_penalty) and repetition_penalty > 0, "a number > 0"),
    ]
    for name, value, ok, want in checks:
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r}")


def _token_ids(name: str, value, vocab: int, single: bool = False) -> list:
    """None, a token id or (unless single) several, as Python ints in [0, vocab): ints, NumPy
    integers and integer tensors (0-d, or 1-D for several) are accepted."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor) and value.dim() <= 1 and not value.is_floating_point() and \
            value.dtype != torch.bool:
        value = value.tolist()
    items = [value] if single or not isinstance(value, (list, tuple, set)) else list(value)
    ids = []
    for v in items:
        try:
            if isinstance(v, bool):
                raise TypeError
            ids.append(operator.index(v))
        except TypeError:
            want = "a token id" if single else "a token id or a list of them"
            raise TypeError(f"{name} must be {want} (int), got {value!r}") from None
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab}), got {value!r}")
    return ids


def process_logits(logits: torch.Tensor, seen: Optional[torch.Tensor] = None,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """Next-token scores (b, V) after transformers' processors, in its order: repetition penalty,
    then (when sampling) temperature, top-k, top-p, min-p. Removed tokens get -inf."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:   # CTRL: shrink the logits already seen
        penalised = torch.where(logits < 0, logits * repetition_penalty,
                                logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not do_sample:
        return logits
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]      # (b, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)                                     # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False                                                   # keep best
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -math.inf)
    return logits


class _StaticDecode:
    """The decoding step on static buffers — token ids in, logits out, the caches updated in
    place — as a CUDA graph needs them: on CUDA it is captured once and replayed per token
    (the official cg=True); elsewhere the very same step runs eagerly on the same buffers.
    `decode` (tokens, cache) -> logits is the step: model._decode, or its compiled form."""

    def __init__(self, model: Mamba2LMHeadModel, cache: list, batch_size: int, decode):
        self.decode, self.cache = decode, cache          # decode: (tokens, cache) -> logits
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.graph = None
        if model.device.type == "cuda":
            scratch = [InferenceCache(c.conv_state.clone(), c.ssm_state.clone()) for c in cache]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                 # warm-up on copies of the caches
                for _ in range(2):
                    self.decode(self.tokens, scratch)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):            # records, runs nothing
                self.logits = self.decode(self.tokens, cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.graph is None:
            return self.decode(self.tokens, self.cache)
        self.graph.replay()
        return self.logits


def _compiled_decode(model: Mamba2LMHeadModel):
    """model._decode through torch.compile: the whole step as one graph of fused kernels, so
    that the state's decay, input and read-out are one pass over it instead of three ops. Shapes
    are static (one compilation per batch size, reused by later calls). torch keeps at most
    torch._dynamo.config.recompile_limit (8) compilations of the step per process, over batch
    sizes, dtypes and models together; past them it warns and runs the step eagerly (the same
    tokens)."""
    compiled = torch.compile(model._decode, dynamic=False)

    def decode(tokens, cache):
        try:
            return compiled(tokens, cache)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise RuntimeError(f"generate(compile=True): torch.compile could not build the step on "
                               f"{model.device} (on a CPU it needs a working C++ compiler); "
                               f"generate without compile") from e
    return decode


def _check_generate_call(model, input_ids, attention_mask, eos_token_id, pad_token_id, streamer,
                         generator, do_sample: bool, cuda_graph, compile):
    """generate's other arguments, checked before anything runs: (eos ids, pad id, the attention
    mask as bools or None)."""
    _check_tensor("input_ids", input_ids, (None, None), device=model.device,
                  dtypes=(torch.int64, torch.int32))
    vocab = model.config.vocab_size
    eos = _token_ids("eos_token_id", eos_token_id, vocab)
    if pad_token_id is not None:
        pad = _token_ids("pad_token_id", pad_token_id, vocab, single=True)[0]
    else:
        pad = eos[0] if eos else 0                       # transformers' default: the first eos
    if streamer is not None and not all(callable(getattr(streamer, m, None))
                                        for m in ("put", "end")):
        raise TypeError(f"streamer must have put() and end() methods (as transformers' streamers), "
                        f"got {type(streamer).__name__}")
    mask = None
    if attention_mask is not None:
        mask = _check_attention_mask(attention_mask, input_ids, left_only=True)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if (cuda_graph or compile) and model.config.attn_layer_idx:
        flag = "cuda_graph" if cuda_graph else "compile"
        raise ValueError(f"{flag}=True decodes pure Mamba-2 models (an attention layer's step "
                         f"reads a growing number of keys), this one has attention at layers "
                         f"{list(model.config.attn_layer_idx)}")
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {model.device}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if do_sample and generator.device.type != model.device.type:
            raise ValueError(f"generator is on {generator.device}, the model on {model.device}: "
                             f"make it with torch.Generator(device=...) on the model's device")
    return eos, pad, mask


def generate(model: Mamba2LMHeadModel, input_ids: torch.Tensor, max_new_tokens: int = 20,
             attention_mask: Optional[torch.Tensor] = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id=None,
             generator: Optional[torch.Generator] = None, streamer=None,
             cuda_graph: bool = False, compile: bool = False) -> torch.LongTensor:
    """Autoregressive decoding: one chunked prefill of the prompt (logits for the last position
    only), then one constant-time step per token through the inference cache.

    input_ids (b, l); attention_mask (b, l) for left-padded batches: the padding is a segment of
    its own (seq_idx), so every row gives exactly the tokens its prompt gives alone. eos_token_id:
    int or list; a row that emits one is finished and padded with pad_token_id (default: the first
    eos id). Sampling as transformers (temperature 0 means greedy). streamer: put(tokens) is called
    with the prompt, then with each new (b,) token tensor; end() at the finish. Returns
    (b, l + new) tokens. cuda_graph=True (CUDA, pure Mamba-2 models) replays each step from a
    CUDA graph; the tokens are the same. compile=True (pure Mamba-2 models) runs each step
    through torch.compile, which fuses the state's decay, input and read-out into one pass: the
    first step of a batch size compiles (40-60 s for 24 layers on a 2-core CPU), later ones are
    faster (see README); logits equal the eager step's to rounding. With cuda_graph=True too,
    the graph captures the compiled step.

    The steps never wait for the device: the prompt's ids are checked once, sampled ids are in
    range by construction; with eos_token_id set, one check per step asks whether every row has
    finished.
    """
    _check_generation_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    do_sample = do_sample and temperature > 0
    eos, pad, mask = _check_generate_call(model, input_ids, attention_mask, eos_token_id,
                                          pad_token_id, streamer, generator, do_sample, cuda_graph,
                                          compile)
    b, l = input_ids.shape
    vocab = model.config.vocab_size
    seq_idx = None if mask is None or mask.all() else mask.int()   # pads: segment 0, prompt: 1

    cache = model.allocate_inference_cache(b, max_seqlen=l + max_new_tokens)
    logits = model(input_ids, cache=cache, seq_idx=seq_idx, num_last_tokens=1)[:, -1, :vocab]
    if streamer is not None:                       # the prompt was accepted: it is shown
        streamer.put(input_ids.cpu())
    seen = None
    if repetition_penalty != 1.0:   # (b, V): tokens present so far, the prompt's padding excluded
        present = input_ids < vocab if mask is None else mask & (input_ids < vocab)
        rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, l)
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=input_ids.device)
        seen[rows[present], input_ids[present]] = True
    decode = _compiled_decode(model) if compile else model._decode
    step = _StaticDecode(model, cache, b, decode) if cuda_graph else \
        (lambda tokens: decode(tokens, cache))
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    out = [input_ids]
    for i in range(max_new_tokens):
        scores = process_logits(logits, seen, do_sample, temperature, top_k, top_p, min_p,
                                repetition_penalty)
        if do_sample:
            probs = scores.softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)   # (b,)
        else:
            next_token = scores.argmax(-1)                                              # (b,)
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
        logits = step(next_token)[:, :vocab]                                           # (b, V)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


# ================================================================================= 13. command line

class TextStreamer:
    """Prints decoded text as tokens arrive (batch size 1); put/end as transformers' streamers."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.tokens, self.printed = [], 0

    def put(self, tokens: torch.Tensor):
        self.tokens.extend(tokens.reshape(-1).tolist())
        self._print(final=False)

    def end(self):
        self._print(final=True)
        print(flush=True, file=self.file)

    def _print(self, final: bool):
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:   # wait for the rest of a multi-byte character
            return
        print(text[self.printed:], end="", flush=True, file=self.file)
        self.printed = len(text)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    own = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    has_own = any((path / f).is_file() for f in own)
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
    ap = argparse.ArgumentParser(
        description="Generate text with a Mamba-2 language model (pure PyTorch).")
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
    try:
        _generate_from_command_line(args)
    except _UserError as e:   # a user's mistake: one line, status 2, as argparse reports its own
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:   # `python mamba2.py ... | head -1`: the reader has gone; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)


class _UserError(Exception):
    """A mistake in the command line's arguments, reported as `error: ...` with status 2."""


def _generate_from_command_line(args):
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty)
    try:
        _check_generation_args(**sampling)
    except ValueError as e:                      # "top_p must be ..." -> "--top-p must be ..."
        name, rest = str(e).split(" ", 1)
        raise _UserError(f"--{name.replace('_', '-')} {rest}") from None
    if not -2**63 <= args.seed < 2**64:
        raise _UserError(f"--seed must fit in 64 bits, got {args.seed}")
    if not args.prompt:
        raise _UserError("the prompt is empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise _UserError("the prompt is not valid UTF-8 text") from None
    try:
        device = _pick_device(args.device)
        _as_device(device)
    except (RuntimeError, ValueError) as e:
        raise _UserError(f"--device {args.device}: {e}") from None
    try:
        path = resolve_checkpoint(args.model)
        model = Mamba2LMHeadModel.from_pretrained(path, device=device, dtype=args.dtype)
    except (ValueError, TypeError, OSError) as e:
        raise _UserError(f"--model {args.model}: {e}") from None
    try:
        tokenizer = _load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise _UserError(f"no tokenizer for {args.model}: {e}") from None
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if input_ids.shape[1] == 0:
        raise _UserError("the prompt has no tokens")
    if int(input_ids.max()) >= model.config.vocab_size:
        raise _UserError(f"the tokenizer of {args.model} gives ids up to {int(input_ids.max())}, "
                         f"beyond the model's vocab_size {model.config.vocab_size}: they do not "
                         f"belong together")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(input_ids, do_sample=args.temperature > 0, generator=generator,
                         eos_token_id=tokenizer.eos_token_id, streamer=TextStreamer(tokenizer),
                         **sampling)
    seconds = time.perf_counter() - start
    new = out.shape[1] - input_ids.shape[1]
    print(f"[{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s on {device}, "
          f"{args.dtype}]", flush=True)


if __name__ == "__main__":
    main()
