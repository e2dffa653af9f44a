"""Hostile input (to be merged into test_mamba2.py): every case asserts the exact outcome."""
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import mamba2
from mamba2 import (InferenceCache, Mamba2, Mamba2Config, Mamba2ForSequenceClassification,
                    Mamba2LMHeadModel, causal_conv1d, causal_conv1d_step,
                    mamba_split_conv1d_scan_combined, rms_norm_gated, ssd, ssd_step)

F64 = torch.float64
REPO = Path(__file__).resolve().parent
HOSTILE = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=_g(seed), dtype=F64).to(dtype)


@torch.no_grad()
def _shake(module, seed=0):
    """Every parameter away from its special value (D and norms != 1, biases != 0, init states)."""
    g = _g(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
        last = name.rsplit(".", 1)[-1]
        if last == "D" or name.endswith("norm.weight") or name.endswith("norm_f.weight") or \
                name.endswith("norm2.weight"):
            p.copy_(1 + 0.4 * noise)
        elif last in ("dt_bias", "A_log"):
            p.add_(0.3 * noise)
        elif last in ("init_states", "bias") or "conv1d" in name:
            p.copy_(0.5 * noise)
    return module


def _block(seed=0, dtype=F64, **cfg):
    torch.manual_seed(seed)
    base = dict(d_model=8, d_state=3, headdim=4, chunk_size=4)
    return _shake(Mamba2(Mamba2Config(**{**base, **cfg}), dtype=dtype), seed)


def _lm(seed=0, dtype=F64, **cfg):
    torch.manual_seed(seed)
    base = dict(d_model=16, n_layer=2, d_state=4, headdim=8, chunk_size=4, vocab_size=37,
                pad_vocab_size_multiple=8)
    return _shake(Mamba2LMHeadModel(Mamba2Config(**{**base, **cfg}), dtype=dtype), seed).eval()


def _snapshot(caches):
    caches = caches if isinstance(caches, (list, tuple)) else [caches]
    return [(c.conv_state.clone(), c.ssm_state.clone()) for c in caches]


def _unchanged(caches, snap):
    caches = caches if isinstance(caches, (list, tuple)) else [caches]
    return all(torch.equal(c.conv_state, a) and torch.equal(c.ssm_state, b)
               for c, (a, b) in zip(caches, snap))


# ====================================================================== the error table

def _scan(**over):
    kw = dict(x=_randn(2, 6, 4, 3), dt=_randn(2, 6, 4).abs() + 0.1, A=-_randn(4).abs() - 0.1,
              B=_randn(2, 6, 2, 5), C=_randn(2, 6, 2, 5), chunk_size=4)
    kw.update(over)
    return lambda: ssd(**kw)


def _step(**over):
    kw = dict(x=_randn(2, 4, 3), dt=_randn(2, 4).abs() + 0.1, A=-_randn(4).abs() - 0.1,
              B=_randn(2, 2, 5), C=_randn(2, 2, 5), state=_randn(2, 4, 3, 5))
    kw.update(over)
    return lambda: ssd_step(**kw)


def _conv(**over):
    kw = dict(x=_randn(2, 7, 6), weight=_randn(6, 1, 4), bias=_randn(6))
    kw.update(over)
    return lambda: causal_conv1d(**kw)


def _norm(**over):
    kw = dict(x=_randn(2, 5, 8), z=_randn(2, 5, 8), weight=_randn(8), group_size=4)
    kw.update(over)
    return lambda: rms_norm_gated(**kw)


def _combined(**over):
    block = _block(ngroups=2)
    c = block.config
    kw = dict(zxbcdt=block.in_proj(_randn(2, 5, 8)).detach(), conv1d_weight=block.conv1d.weight,
              conv1d_bias=block.conv1d.bias, dt_bias=block.dt_bias, A=-torch.exp(block.A_log),
              D=block.D, chunk_size=4, headdim=c.headdim, ngroups=c.ngroups,
              rmsnorm_weight=block.norm.weight, outproj_weight=block.out_proj.weight)
    kw.update(over)
    return lambda: mamba_split_conv1d_scan_combined(**{k: v for k, v in kw.items()})


def _cfg(**over):
    return lambda: Mamba2Config(**{"d_model": 16, "headdim": 8, **over})


_WRONG = [   # (case, call, exception type, the argument the message names)
    # config fields of the wrong type or value
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
    ("cfg dt_limit inverted", _cfg(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"),
    ("cfg rmsnorm str", _cfg(rmsnorm="false"), TypeError, "rmsnorm"),
    ("cfg learnable str", _cfg(learnable_init_states="true"), TypeError,
     "learnable_init_states"),
    ("cfg bias int", _cfg(bias=1), TypeError, "bias"),
    ("cfg tie None", _cfg(tie_embeddings=None), TypeError, "tie_embeddings"),
    ("cfg d_intermediate bool", _cfg(d_intermediate=True), TypeError, "d_intermediate"),
    ("cfg d_intermediate negative", _cfg(d_intermediate=-1), ValueError, "d_intermediate"),
    ("cfg headdim bool", _cfg(headdim=True), TypeError, "headdim"),
    ("cfg expand float", _cfg(expand=2.0), TypeError, "expand"),
    ("cfg vocab float", _cfg(vocab_size=1.5), TypeError, "vocab_size"),
    ("cfg n_layer 0", _cfg(n_layer=0), ValueError, "n_layer"),
    # the scan
    ("ssd dt broadcast", _scan(dt=_randn(2, 6, 1).abs()), ValueError, "dt"),
    ("ssd A broadcast", _scan(A=-torch.ones(1, dtype=F64)), ValueError, "A"),
    ("ssd D broadcast", _scan(D=torch.ones(1, dtype=F64)), ValueError, "D"),
    ("ssd D wrong p", _scan(D=torch.ones(4, 2, dtype=F64)), ValueError, "D"),
    ("ssd x int", _scan(x=torch.ones(2, 6, 4, 3, dtype=torch.long)), TypeError, "x"),
    ("ssd x rank", _scan(x=_randn(6, 4, 3)), ValueError, "x"),
    ("ssd B groups", _scan(B=_randn(2, 6, 3, 5), C=_randn(2, 6, 3, 5)), ValueError, "B"),
    ("ssd C shape", _scan(C=_randn(2, 6, 2, 4)), ValueError, "C"),
    ("ssd B broadcast batch", _scan(B=_randn(1, 6, 2, 5)), ValueError, "B"),
    ("ssd seq_idx float", _scan(seq_idx=torch.zeros(2, 6)), TypeError, "seq_idx"),
    ("ssd seq_idx uint8", _scan(seq_idx=torch.tensor([[0, 1, 0, 0, 0, 0]] * 2,
                                                     dtype=torch.uint8)), TypeError, "seq_idx"),
    ("ssd seq_idx decreasing", _scan(seq_idx=torch.tensor([[0, 1, 1, 0, 0, 0]] * 2)),
     ValueError, "seq_idx"),
    ("ssd seq_idx broadcast", _scan(seq_idx=torch.zeros(1, 6, dtype=torch.long)), ValueError,
     "seq_idx"),
    ("ssd initial_states", _scan(initial_states=_randn(2, 4, 3, 4)), ValueError,
     "initial_states"),
    ("ssd chunk 0", _scan(chunk_size=0), ValueError, "chunk_size"),
    ("ssd chunk -1", _scan(chunk_size=-1), ValueError, "chunk_size"),
    ("ssd chunk 2.5", _scan(chunk_size=2.5), TypeError, "chunk_size"),
    ("ssd chunk None", _scan(chunk_size=None), TypeError, "chunk_size"),
    ("ssd chunk True", _scan(chunk_size=True), TypeError, "chunk_size"),
    ("ssd_step dt broadcast", _step(dt=_randn(2, 1).abs()), ValueError, "dt"),
    ("ssd_step D broadcast", _step(D=torch.ones(1, dtype=F64)), ValueError, "D"),
    ("ssd_step state", _step(state=_randn(2, 4, 3, 4)), ValueError, "state"),
    ("ssd_step state expanded", _step(state=_randn(1, 4, 3, 5).expand(2, 4, 3, 5)), ValueError,
     "state"),
    ("ssd_step x int", _step(x=torch.ones(2, 4, 3, dtype=torch.int32)), TypeError, "x"),
    # the convolution
    ("conv state width w-1", _conv(state=_randn(2, 6, 3)), ValueError, "state"),
    ("conv weight", _conv(weight=_randn(6, 2, 4)), ValueError, "weight"),
    ("conv weight channels", _conv(weight=_randn(5, 1, 4)), ValueError, "weight"),
    ("conv bias", _conv(bias=_randn(1)), ValueError, "bias"),
    ("conv x int", _conv(x=torch.ones(2, 7, 6, dtype=torch.long)), TypeError, "x"),
    ("conv seq_idx", _conv(seq_idx=torch.zeros(2, 6, dtype=torch.long)), ValueError, "seq_idx"),
    ("conv step state", lambda: causal_conv1d_step(_randn(2, 6), _randn(6, 1, 4), None,
                                                   _randn(2, 6, 3)), ValueError, "state"),
    ("conv step x", lambda: causal_conv1d_step(_randn(2, 5), _randn(6, 1, 4), None,
                                               _randn(2, 6, 4)), ValueError, "weight"),
    ("conv step state expanded", lambda: causal_conv1d_step(
        _randn(2, 6), _randn(6, 1, 4), None, _randn(1, 6, 4).expand(2, 6, 4)), ValueError,
     "state"),
    # the norm
    ("norm z broadcast", _norm(z=_randn(1, 1, 8)), ValueError, "z"),
    ("norm weight", _norm(weight=_randn(1)), ValueError, "weight"),
    ("norm group_size", _norm(group_size=3), ValueError, "group_size"),
    ("norm eps 0", _norm(eps=0.0), ValueError, "eps"),
    ("norm x int", _norm(x=torch.ones(2, 5, 8, dtype=torch.long)), TypeError, "x"),
    # the official fused entry point
    ("combined ngroups", _combined(ngroups=4), ValueError, "ngroups"),
    ("combined ngroups 3", _combined(ngroups=3), ValueError, "ngroups"),
    ("combined extra columns", lambda: _combined(zxbcdt=F.pad(_combined_zxbcdt(), (0, 2)))(),
     ValueError, "outproj_weight"),
    ("combined odd columns", lambda: _combined(zxbcdt=F.pad(_combined_zxbcdt(), (0, 1)))(),
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


def _combined_zxbcdt():
    block = _block(ngroups=2)
    return block.in_proj(_randn(2, 5, 8)).detach()


@pytest.mark.parametrize("case, call, exc, name", _WRONG, ids=[c[0] for c in _WRONG])
def test_hostile_inputs_get_a_named_error(case, call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_combined_headdim_taken_from_D_of_shape_h_p():
    """Official Mamba2 calls the fused function with headdim=None when D_has_hdim: D (h, p)
    gives it. The result equals the block with D_has_hdim."""
    block = _block(D_has_hdim=True)
    c = block.config
    u = _randn(2, 9, 8)
    with torch.no_grad():
        want = block(u)
        got = mamba_split_conv1d_scan_combined(
            block.in_proj(u), block.conv1d.weight, block.conv1d.bias, block.dt_bias,
            -torch.exp(block.A_log), block.D.view(c.nheads, c.headdim), c.chunk_size,
            headdim=None, ngroups=c.ngroups, rmsnorm_weight=block.norm.weight, rmsnorm_eps=1e-5,
            norm_before_gate=False, outproj_weight=block.out_proj.weight)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


# ====================================================================== model inputs

@pytest.fixture(scope="module")
def hostile_lm():
    return _lm(seed=3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.float32,
                                   torch.bool])
def test_input_ids_of_a_small_or_wrong_dtype_are_named(hostile_lm, dtype):
    ids = torch.randint(0, 30, (2, 5), generator=_g(1))
    with pytest.raises(TypeError, match="input_ids"):
        hostile_lm(ids.to(dtype))
    with pytest.raises(TypeError, match="input_ids"):
        hostile_lm.generate(ids.to(dtype), max_new_tokens=1)
    with pytest.raises(TypeError, match="labels"):
        hostile_lm(ids, labels=ids.to(dtype))


def test_model_inputs_batch_zero_lists_and_lengths(hostile_lm):
    ids = torch.randint(0, 30, (2, 5), generator=_g(2))
    with pytest.raises(ValueError, match="input_ids"):
        hostile_lm(ids[:0])
    with pytest.raises(TypeError, match="input_ids"):
        hostile_lm(ids.tolist())
    with pytest.raises(ValueError, match="num_last_tokens"):
        hostile_lm(ids, num_last_tokens=6)
    assert hostile_lm(ids, num_last_tokens=5).shape[1] == 5
    block = _block()
    u = _randn(1, 6, 8)
    with pytest.raises(TypeError, match="cu_seqlens"):
        block(u, cu_seqlens=[0, 2, 6])
    with pytest.raises(TypeError, match="cu_seqlens"):
        block(u, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\bu\b"):
        block(_randn(0, 6, 8))


def test_one_cache_shared_by_two_layers_is_refused(hostile_lm):
    ids = torch.randint(0, 30, (1, 4), generator=_g(3))
    cache = hostile_lm.allocate_inference_cache(1)
    shared = [cache[0], cache[0]]
    snap = _snapshot(shared)
    with pytest.raises(ValueError, match="cache"):
        hostile_lm(ids, cache=shared)
    assert _unchanged(shared, snap)
    halves = [InferenceCache(cache[0].conv_state, cache[1].ssm_state), cache[1]]
    with pytest.raises(ValueError, match="share memory"):
        hostile_lm(ids, cache=halves)


def test_classification_mask_with_two_runs_is_refused():
    clf = Mamba2ForSequenceClassification(Mamba2Config(d_model=16, n_layer=1, d_state=4,
                                                       headdim=8, vocab_size=20), dtype=F64)
    ids = torch.randint(0, 20, (2, 6), generator=_g(4))
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask"):
        clf(ids, attention_mask=mask)
    clf(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]))


# ====================================================================== caches: never half-updated

def _used_lm_cache(model, b, seed):
    cache = model.allocate_inference_cache(b)
    with torch.no_grad():
        model(torch.randint(0, 30, (b, 5), generator=_g(seed)), cache=cache)
    return cache


@pytest.mark.parametrize("length", [1, 4], ids=["step", "prompt"])
@pytest.mark.parametrize("case", ["expanded_conv", "strided_slices", "inference_mode_with_grad",
                                  "requires_grad", "layer_k_raises"])
def test_failed_call_leaves_every_cache_as_it_was(hostile_lm, case, length, monkeypatch):
    model = hostile_lm
    b = 2
    cache = _used_lm_cache(model, b, seed=5)
    ids = torch.randint(0, 30, (b, length), generator=_g(6))
    grad = False
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
    snap = _snapshot(cache)
    with torch.set_grad_enabled(grad):
        with pytest.raises((ValueError, RuntimeError), match="cache|layer 1 failed"):
            model(ids, cache=cache)
    assert _unchanged(cache, snap), "a failed call changed a cache"


def test_failed_lm_head_leaves_caches_as_they_were(hostile_lm, monkeypatch):
    """The caches move on only when the whole call succeeds, the head included."""
    cache = _used_lm_cache(hostile_lm, 1, seed=7)
    snap = _snapshot(cache)

    def boom(*a, **k):
        raise RuntimeError("head failed")
    monkeypatch.setattr(hostile_lm.lm_head, "forward", boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="head failed"):
        hostile_lm(torch.tensor([[3]]), cache=cache)
    assert _unchanged(cache, snap)


# ====================================================================== generate

def test_generate_takes_numpy_and_tensor_token_ids(hostile_lm):
    ids = torch.randint(0, 30, (2, 4), generator=_g(8))
    free = hostile_lm.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])
    want = hostile_lm.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    for e, p in [(np.int64(eos), np.int32(1)), (torch.tensor(eos), torch.tensor(1)),
                 ([np.int64(eos)], 1), (torch.tensor([eos]), 1)]:
        assert torch.equal(hostile_lm.generate(ids, max_new_tokens=6, eos_token_id=e,
                                               pad_token_id=p), want)
    for bad, exc in [(2.5, TypeError), ("3", TypeError), (True, TypeError), (-1, ValueError),
                     (37, ValueError), ([1, 2.0], TypeError)]:
        with pytest.raises(exc, match="eos_token_id"):
            hostile_lm.generate(ids, max_new_tokens=2, eos_token_id=bad)
    with pytest.raises(TypeError, match="pad_token_id"):
        hostile_lm.generate(ids, max_new_tokens=2, eos_token_id=3, pad_token_id=[1, 2])


def test_streamer_without_end_is_refused_before_any_work(hostile_lm):
    calls = []

    class HalfStreamer:
        def put(self, value):
            calls.append(value)

    with pytest.raises(TypeError, match="streamer"):
        hostile_lm.generate(torch.tensor([[1, 2]]), max_new_tokens=3, streamer=HalfStreamer())
    assert calls == []


# ====================================================================== checkpoints: no data loss

def _save_and_logits(model, d, **kw):
    model.save_pretrained(d, **kw)
    ids = torch.randint(0, 30, (2, 7), generator=_g(9))
    with torch.no_grad():
        return ids, model(ids)


@pytest.mark.parametrize("fmt", ["mamba_ssm", "full", "transformers"])
@pytest.mark.parametrize("failing", ["safetensors", "torch_save", "rename"])
def test_save_failure_midway_keeps_the_old_checkpoint(tmp_path, monkeypatch, fmt, failing):
    old = _lm(seed=10, tie_embeddings=False)
    new = _lm(seed=11, tie_embeddings=False)
    d = tmp_path / "ckpt"
    ids, want = _save_and_logits(old, d, format=fmt)
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
        if fmt != "mamba_ssm":
            pytest.skip("only the mamba_ssm format writes pytorch_model.bin")
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
    with pytest.raises(OSError):
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
    _lm(seed=12).save_pretrained(d, format="transformers", max_shard_size=2000)   # sharded first
    shards = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    mine = {"model_backup.safetensors": b"a", "model-v1.safetensors": b"b",
            "pytorch_model_old.bin": b"c", "tokenizer.json": b"{}"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    model = _lm(seed=13)
    ids, want = _save_and_logits(model, d, format=fmt)
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
    model = _lm(seed=14, tie_embeddings=False)
    model.lm_head.weight = model.backbone.embedding.weight          # tied by hand, not by config
    ids, want = _save_and_logits(model, tmp_path / "tied", format="full")
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


def test_official_format_writes_official_keys_and_refuses_the_rest(tmp_path):
    model = _lm(seed=15)
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
            _lm(**bad).save_pretrained(tmp_path / "refused")
        assert not (tmp_path / "refused" / "config.json").exists()
    for bad, what in [(dict(norm_before_gate=True), "norm_before_gate"),
                      (dict(d_intermediate=8), "d_intermediate"), (dict(D_has_hdim=True),
                                                                    "D_has_hdim")]:
        with pytest.raises(ValueError, match=what):
            _lm(**bad).save_pretrained(tmp_path / "refused", format="transformers")


# ====================================================================== checkpoints: confinement

def _saved(tmp_path, name="ckpt", **kw):
    d = tmp_path / name
    _lm(seed=16).save_pretrained(d, format="transformers", **kw)
    return d


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
    with pytest.raises(ValueError, match="outside the checkpoint|only relative|stored twice"):
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
    Mamba2LMHeadModel.from_pretrained(snap)


# ====================================================================== checkpoints: named errors

@pytest.mark.parametrize("content, key", [
    (b"[1, 2, 3]", "JSON object"),
    (b'{"d_model": 16, "n_layer": 2, "vocab_size": 37, \xff}', "UTF-8"),
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
])
def test_bad_configs_name_the_file_and_key(tmp_path, content, key):
    d = _saved(tmp_path)
    (d / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=key) as info:
        Mamba2LMHeadModel.from_pretrained(d)
    assert "config.json" in str(info.value)


def test_official_configs_read_with_official_defaults(tmp_path):
    """A config.json without pad_vocab_size_multiple pads by 8, as MambaConfig does."""
    model = _lm(seed=17, vocab_size=37, pad_vocab_size_multiple=8)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["pad_vocab_size_multiple"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path / "m")
    assert loaded.config.pad_vocab_size_multiple == 8 and loaded.config.padded_vocab_size == 40


def test_dtype_and_device_arguments(tmp_path):
    d = tmp_path / "m"
    model = _lm(seed=18, dtype=torch.float32)
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
    model = _lm(seed=19, dtype=torch.float32)
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


# ====================================================================== the command line

_CLI_CASES = [
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
    _CLI_CASES.append((["hi", "--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("argv, message", _CLI_CASES, ids=[" ".join(a) for a, _ in _CLI_CASES])
def test_command_line_mistakes_are_one_line_errors(argv, message):
    run = subprocess.run([sys.executable, "mamba2.py", *argv], cwd=REPO, capture_output=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_command_line_non_utf8_prompt_and_closed_pipe():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "mamba2.py", os.fsdecode(b"a\xff")], cwd=REPO,
                         capture_output=True, env=env, timeout=120)
    assert run.returncode == 2 and b"UTF-8" in run.stderr and b"Traceback" not in run.stderr
    run = subprocess.run(f"{sys.executable} mamba2.py 'def f(x):' --max-new-tokens 300 | head -c 5",
                         shell=True, cwd=REPO, capture_output=True, env=env, timeout=120)
    assert b"Traceback" not in run.stderr and b"Error" not in run.stderr, run.stderr


# ====================================================================== honest results

def _plant(u, row, t, channel, value):
    v = u.clone()
    v[row, t, channel] = value
    return v


@HOSTILE
@given(data=st.data())
def test_non_finite_values_never_reach_earlier_tokens_or_other_segments(data):
    """An output at t depends only on tokens <= t of its own segment and row, whatever the later
    tokens hold: NaN or ±inf planted anywhere leaves every other output bit for bit as it was,
    and the outputs it does reach are non-finite (the honest result)."""
    l = data.draw(st.integers(1, 24), label="l")
    chunk = data.draw(st.sampled_from([1, 3, 4, 8]), label="chunk")
    learnable = data.draw(st.booleans(), label="learnable")
    packed = data.draw(st.booleans(), label="packed")
    block = _block(seed=data.draw(st.integers(0, 99)), chunk_size=chunk, ngroups=2,
                   learnable_init_states=learnable)
    u = _randn(2, l, 8, seed=l)
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
    with torch.no_grad(), _span_len(span):
        clean = block(u, seq_idx=seq_idx)
        dirty = block(_plant(u, row, t, channel, value), seq_idx=seq_idx)
    seg = None if seq_idx is None else seq_idx[row]
    reached = torch.zeros(2, l, dtype=torch.bool)
    for s in range(l):
        reached[row, s] = s >= t and (seg is None or seg[s] == seg[t])
    assert torch.equal(dirty[~reached], clean[~reached])
    assert not torch.isfinite(dirty[reached]).any()


class _span_len:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = dict(mamba2.SPAN_LEN)
        mamba2.SPAN_LEN["cpu"] = self.n

    def __exit__(self, *exc):
        mamba2.SPAN_LEN.clear()
        mamba2.SPAN_LEN.update(self.old)


def test_non_finite_at_the_scan_stays_in_its_head_and_after_its_token():
    x, dt = _randn(1, 13, 4, 3), _randn(1, 13, 4).abs() + 0.1
    A, B, C = -_randn(4).abs() - 0.1, _randn(1, 13, 2, 5), _randn(1, 13, 2, 5)
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
    block = _block(seed=21, dtype=torch.float16, d_model=16, d_state=4, headdim=8, chunk_size=8)
    u = _randn(1, 12, 16, seed=22, dtype=torch.float16)
    with torch.no_grad():
        clean = block(u)
        loud = u.clone()
        loud[0, -1] = 6e4                                  # in_proj overflows fp16
        out = block(loud)
        assert not torch.isfinite(block.in_proj(loud)[0, -1]).all()
    assert torch.equal(out[:, :-1], clean[:, :-1])


@HOSTILE
@given(data=st.data())
def test_packed_equals_separate_with_learned_initial_states(data):
    l = data.draw(st.integers(2, 30), label="l")
    block = _block(seed=data.draw(st.integers(0, 99)), learnable_init_states=True,
                   chunk_size=data.draw(st.sampled_from([1, 3, 4, 16])), ngroups=2)
    cuts = sorted(data.draw(st.sets(st.integers(1, l - 1), min_size=1, max_size=4)))
    bounds = list(zip([0] + cuts, cuts + [l]))
    u = _randn(1, l, 8, seed=l)
    seq_idx = torch.tensor([[k for k, (s, e) in enumerate(bounds) for _ in range(s, e)]])
    span = data.draw(st.sampled_from([1024, 3]))
    with torch.no_grad(), _span_len(span):
        packed, final = block(u, seq_idx=seq_idx, return_final_states=True)
        for s, e in bounds:
            alone, alone_final = block(u[:, s:e], return_final_states=True)
            torch.testing.assert_close(packed[:, s:e], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(final, alone_final, rtol=0, atol=1e-12)


def test_left_padded_generate_and_padded_classification_with_learned_states():
    model = _lm(seed=23, learnable_init_states=True)
    prompts = [torch.randint(0, 30, (1, n), generator=_g(n)) for n in (2, 6, 4)]
    alone = [model.generate(p, max_new_tokens=6) for p in prompts]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 6 - p.shape[1]:], mask[i, 6 - p.shape[1]:] = p[0], 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 6:], alone[i][0, p.shape[1]:]), i
    torch.manual_seed(0)
    clf = _shake(Mamba2ForSequenceClassification(model.config, num_labels=3, dtype=F64), 24)
    for side in ("left", "right"):
        ids = torch.full((3, 6), 5, dtype=torch.long)
        mask = torch.zeros(3, 6, dtype=torch.long)
        for i, p in enumerate(prompts):
            n = p.shape[1]
            sl = slice(6 - n, 6) if side == "left" else slice(0, n)
            ids[i, sl], mask[i, sl] = p[0], 1
        with torch.no_grad():
            got = clf(ids, attention_mask=mask)
            want = torch.cat([clf(p) for p in prompts])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ====================================================================== gradients

def test_second_derivatives_through_scan_norm_and_loss():
    b, l, h, p, g, n = 1, 7, 2, 2, 1, 2
    leaves = [_randn(b, l, h, p, seed=1), _randn(b, l, h, seed=2).abs() + 0.1,
              -_randn(h, seed=3).abs() - 0.2, _randn(b, l, g, n, seed=4), _randn(b, l, g, n, seed=5),
              _randn(h, seed=6), _randn(b, h, p, n, seed=7), _randn(h, p, n, seed=8)]
    leaves = [t.requires_grad_() for t in leaves]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])

    def scan(x, dt, A, B, C, D, h0, S0):
        return mamba2._ssd(x, dt, A, B, C, 3, D, h0, seq_idx, S0)

    assert torch.autograd.gradgradcheck(scan, leaves)
    x, z, w = _randn(3, 8, seed=9), _randn(3, 8, seed=10), 1 + _randn(8, seed=11) * 0.3
    for gate_first in (False, True):
        assert torch.autograd.gradgradcheck(
            lambda x, z, w: rms_norm_gated(x, z, w, 1e-5, 4, gate_first),
            [t.clone().requires_grad_() for t in (x, z, w)])
    hid, wt = _randn(5, 4, seed=12).requires_grad_(), _randn(9, 4, seed=13).requires_grad_()
    targets = torch.tensor([1, -100, 3, 0, 6])
    assert torch.autograd.gradgradcheck(
        lambda a, b: mamba2._LinearCrossEntropy.apply(a, b, targets, -100, 7), [hid, wt])


@pytest.mark.parametrize("mem_eff", [True, False])
def test_hessian_vector_product_of_the_block_equals_the_plain_graph(mem_eff):
    """grad(grad(loss) · v) through the block (memory-efficient checkpoint or not) equals the same
    through a block whose scan is recorded op by op (no custom Functions anywhere)."""
    block = _block(seed=25, use_mem_eff_path=mem_eff, learnable_init_states=True)
    u = _randn(2, 9, 8, seed=26).requires_grad_()
    v = _randn(2, 9, 8, seed=27)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])

    def hvp(run):
        (gu,) = torch.autograd.grad(run(u).square().sum(), u, create_graph=True)
        return torch.autograd.grad((gu * v).sum(), u)[0]

    got = hvp(lambda x: block(x, seq_idx=seq_idx))
    with torch.enable_grad():
        want = hvp(lambda x: _recorded_block(block, x, seq_idx))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _recorded_block(block, u, seq_idx):
    """The block with its scan evaluated token by token (plain autograd all the way)."""
    w = block.weights()
    cfg = block.config
    zxbcdt = block.in_proj(u)
    z0, x0, z, xBC, dt = zxbcdt.split([0, 0, cfg.d_ssm, cfg.conv_dim, cfg.nheads], -1)
    xBC = F.silu(mamba2._causal_conv1d(xBC, w.conv_weight, w.conv_bias, seq_idx)[0])
    x, B, C = xBC.split([cfg.d_ssm, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], -1)
    dt = F.softplus(dt + w.dt_bias)
    b, l = u.shape[:2]
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
    S = block.init_states.expand(b, h, p, n)
    ys = []
    for t in range(l):
        if t:
            S = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None],
                            block.init_states, S)
        Bt, Ct = B[:, t].repeat_interleave(h // g, 1), C[:, t].repeat_interleave(h // g, 1)
        S = torch.exp(dt[:, t] * w.A)[..., None, None] * S + \
            (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append((S * Ct[:, :, None, :]).sum(-1) + w.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(b, l, -1)
    gate = y * F.silu(z)
    yg = gate.unflatten(-1, (g, -1))
    y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * w.norm_weight
    return F.linear(y, w.out_proj_weight)


def test_explicit_states_carry_gradients_like_the_whole_sequence():
    """ssd in pieces through initial_states -> return_final_states has the whole sequence's
    gradients; the block likewise (its conv history carried by its own reference chain)."""
    x, dt = _randn(2, 17, 4, 3, seed=30), _randn(2, 17, 4, seed=31).abs() + 0.1
    A, B, C = -_randn(4, seed=32).abs() - 0.1, _randn(2, 17, 2, 5, seed=33), _randn(2, 17, 2, 5,
                                                                                  seed=34)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    w = _randn(2, 17, 4, 3, seed=35)
    whole = ssd(x, dt, A, B, C, 4)
    g_whole = torch.autograd.grad((whole * w).sum(), leaves)
    state, pieces = None, []
    for s, e in [(0, 5), (5, 6), (6, 17)]:
        y, state = ssd(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], 4, initial_states=state,
                       return_final_states=True)
        pieces.append(y)
    g_pieces = torch.autograd.grad((torch.cat(pieces, 1) * w).sum(), leaves)
    for a, b in zip(g_pieces, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cache_is_truncated_backpropagation_through_time():
    """Gradients stop at each cached call: the second piece's output does not depend (in the
    graph) on the first piece's input, while its value does."""
    block = _block(seed=36)
    u = _randn(1, 10, 8, seed=37).requires_grad_()
    cache = block.allocate_inference_cache(1)
    block(u[:, :6], cache=cache)
    second = block(u[:, 6:], cache=cache)
    (g,) = torch.autograd.grad(second.sum(), u)
    assert not g[:, :6].any() and g[:, 6:].any()
    with torch.no_grad():
        assert not torch.equal(second, block(u[:, 6:]))


# ====================================================================== hybrid attention layers

_ATTN = dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True, d_conv=3, mlp_dim=16)


def _hybrid(seed=0, dtype=F64, attn=None, **cfg):
    torch.manual_seed(seed)
    base = dict(d_model=32, n_layer=3, d_state=4, headdim=8, chunk_size=4, vocab_size=50,
                pad_vocab_size_multiple=8, attn_layer_idx=[1], attn_cfg={**_ATTN, **(attn or {})})
    return _shake(Mamba2LMHeadModel(Mamba2Config(**{**base, **cfg}), dtype=dtype), seed).eval()


def _rotate_reference(x, positions, dim, base, interleaved):
    """Rotary from its definition, one position and one channel pair at a time."""
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


def _mha_reference(mha, x, seq_idx=None):
    """The attention layer from its definition: in_proj, causal depthwise conv within segments,
    rotary at each token's position in its segment, softmax(q kᵀ scale) v query by query over
    the keys of its segment up to itself (heads of a kv group sharing k and v), out_proj."""
    b, l, _ = x.shape
    h, g, dh = mha.num_heads, mha.num_heads_kv, mha.head_dim
    seq_idx = torch.zeros(b, l, dtype=torch.long) if seq_idx is None else seq_idx
    proj = F.linear(x, mha.in_proj.weight, mha.in_proj.bias)
    qkv, mlp = proj[..., :mha.qkv_dim], proj[..., mha.qkv_dim:]
    if mha.d_conv:
        w = mha.conv1d.weight[:, 0]
        conv = torch.zeros_like(qkv)
        for t in range(l):
            for k in range(mha.d_conv):
                s = t - (mha.d_conv - 1 - k)
                keep = (s >= 0) & (seq_idx[:, max(s, 0)] == seq_idx[:, t])
                conv[:, t] += torch.where(keep[:, None], w[:, k] * qkv[:, max(s, 0)], 0)
        qkv = conv + mha.conv1d.bias
    q, k, v = qkv.split([h * dh, g * dh, g * dh], -1)
    q, k, v = q.unflatten(-1, (h, dh)), k.unflatten(-1, (g, dh)), v.unflatten(-1, (g, dh))
    pos = torch.zeros(b, l, dtype=torch.long)
    for t in range(1, l):
        pos[:, t] = torch.where(seq_idx[:, t] == seq_idx[:, t - 1], pos[:, t - 1] + 1, 0)
    args = (mha.rotary_emb_dim, mha.rotary_emb_base, mha.rotary_emb_interleaved)
    q, k = _rotate_reference(q, pos, *args), _rotate_reference(k, pos, *args)
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


@pytest.mark.parametrize("attn", [
    dict(), dict(rotary_emb_interleaved=True), dict(num_heads_kv=1, d_conv=0, mlp_dim=0),
    dict(num_heads_kv=4, rotary_emb_dim=8, softmax_scale=0.3, qkv_proj_bias=False,
         out_proj_bias=False), dict(causal=False, rotary_emb_dim=0)],
    ids=["halves", "interleaved", "mqa,no_conv,no_mlp", "mha,full_rotary,scale", "bidirectional"])
def test_attention_layer_equals_its_definition(attn):
    model = _hybrid(seed=30, attn=attn)
    mha = model.backbone.layers[1].mixer
    assert isinstance(mha, mamba2.MHA)
    x = _randn(2, 9, 32, seed=31)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        for s in (None, seq_idx):
            torch.testing.assert_close(mha(x, seq_idx=s), _mha_reference(mha, x, s), rtol=0,
                                       atol=1e-12)


def test_rotary_matches_its_definition_at_large_positions():
    x = _randn(2, 5, 3, 8, seed=32)
    pos = torch.tensor([[0, 1, 2, 1000, 65535], [7, 0, 3, 4, 5]])
    for interleaved in (False, True):
        torch.testing.assert_close(mamba2.rotary(x, pos, 6, 10000.0, interleaved),
                                   _rotate_reference(x, pos, 6, 10000.0, interleaved), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("sizes", [[13], [1] * 13, [5, 1, 7], [3, 3, 3, 4]],
                         ids=["whole", "steps", "mixed", "pieces"])
def test_hybrid_whole_steps_and_pieces_agree(sizes):
    model = _hybrid(seed=33)
    ids = torch.randint(0, 50, (2, 13), generator=_g(34))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2, max_seqlen=4)        # it has to grow
        outs, s = [], 0
        for k in sizes:
            outs.append(model(ids[:, s:s + k], cache=cache))
            s += k
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    assert cache[1].length == 13 and isinstance(cache[1], mamba2.AttentionCache)


def test_hybrid_packed_equals_separate_and_padded_generate_equals_alone():
    model = _hybrid(seed=35, learnable_init_states=True)
    ids = torch.randint(0, 50, (2, 14), generator=_g(36))
    seq_idx = torch.tensor([[0] * 5 + [1] * 9, [0] * 2 + [3] * 12])
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)
        for r, cut in ((0, 5), (1, 2)):
            for s, e in ((0, cut), (cut, 14)):
                torch.testing.assert_close(packed[r:r + 1, s:e], model(ids[r:r + 1, s:e]),
                                           rtol=0, atol=1e-12)
    prompts = [torch.randint(0, 50, (1, n), generator=_g(n)) for n in (3, 7, 1)]
    alone = [model.generate(p, max_new_tokens=6) for p in prompts]
    padded = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, 7 - p.shape[1]:], mask[i, 7 - p.shape[1]:] = p[0], 1
    out = model.generate(padded, attention_mask=mask, max_new_tokens=6)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 7:], alone[i][0, p.shape[1]:]), i


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
    src = _shake(Mamba2LMHeadModel(mamba2._config_from_mamba_ssm(config), dtype=torch.float32), 37)
    d = tmp_path / "mamba2attn"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    state = src.state_dict()
    assert "backbone.layers.1.mixer.conv1d.bias" in state          # always there, as official
    assert state["backbone.layers.1.mixer.in_proj.weight"].shape == (16 * 12, 64)
    torch.save(dict(state), d / "pytorch_model.bin")
    loaded = Mamba2LMHeadModel.from_pretrained(d)
    ids = torch.randint(0, 50, (2, 11), generator=_g(38))
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))
    assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=5),
                       src.generate(ids[:1, :4], max_new_tokens=5))
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["attn_layer_idx"] == [1, 3] and again["attn_cfg"] == config["attn_cfg"]
    with pytest.raises(ValueError, match="attention"):
        loaded.save_pretrained(tmp_path / "tf", format="transformers")


def test_hybrid_training_paths_and_non_finite_keys():
    """The fused loss and the memory-efficient path work through attention layers (gradients
    equal the plain path's); a NaN planted at a later token or in another segment reaches no
    earlier or other output."""
    plain = _hybrid(seed=39, use_mem_eff_path=False)
    eff = _hybrid(seed=39, use_mem_eff_path=True)
    ids = torch.randint(0, 50, (2, 10), generator=_g(40))
    grads = []
    for m in (plain, eff):
        m.train()
        m.zero_grad()
        m(ids, labels=ids).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-12)
    mha = plain.backbone.layers[1].mixer
    x = _randn(2, 10, 32, seed=41)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():
        clean = mha(x, seq_idx=seq_idx)
        dirty = mha(_plant(x, 0, 2, 5, math.nan), seq_idx=seq_idx)
        assert torch.equal(dirty[0, :2], clean[0, :2]) and torch.equal(dirty[0, 4:], clean[0, 4:])
        assert torch.equal(dirty[1], clean[1]) and not torch.isfinite(dirty[0, 2:4]).any()
        cache = mha.allocate_inference_cache(2)          # the NaN in segment 0 of the prompt
        mha(_plant(x, 0, 2, 5, math.nan)[:, :6], seq_idx=seq_idx[:, :6], cache=cache)
        step = mha(x[:, 6:7], cache=cache)               # continues segment 1: never sees it
        assert torch.isfinite(step).all()
        torch.testing.assert_close(torch.cat([dirty[:, 4:6], step], 1)[0],
                                   mha(x[:1, 4:7])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("attn, key", [
    (dict(num_heads=3), "num_heads"), (dict(num_heads_kv=3), "num_heads_kv"),
    (dict(rotary_emb_dim=3), "rotary_emb_dim"), (dict(rotary_emb_dim=64), "rotary_emb_dim"),
    (dict(causal="yes"), "causal"), (dict(softmax_scale=0.0), "softmax_scale"),
    (dict(d_conv=-1), "d_conv"), (dict(window=8), "window"), (dict(num_heads=None), "num_heads"),
])
def test_impossible_attention_configs_are_named(attn, key):
    with pytest.raises(ValueError, match=key):
        Mamba2Config(d_model=32, n_layer=2, headdim=8, attn_layer_idx=[0],
                     attn_cfg={**_ATTN, **attn})
    with pytest.raises(ValueError, match="attn_layer_idx"):
        Mamba2Config(d_model=32, n_layer=2, headdim=8, attn_layer_idx=[2], attn_cfg=_ATTN)


def test_hybrid_failed_call_leaves_attention_caches_as_they_were(monkeypatch):
    model = _hybrid(seed=42)
    cache = model.allocate_inference_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5), generator=_g(43)), cache=cache)
    before = [c.state() if isinstance(c, mamba2.AttentionCache) else
              (c.conv_state.clone(), c.ssm_state.clone()) for c in cache]

    def boom(*a, **k):
        raise RuntimeError("layer 2 failed")
    monkeypatch.setattr(model.backbone.layers[2].mixer, "_through_cache", boom)
    for l in (1, 3):
        with torch.no_grad(), pytest.raises(RuntimeError, match="layer 2"):
            model(torch.randint(0, 50, (2, l), generator=_g(44)), cache=cache)
        after = cache[1].state()
        assert after[0] == before[1][0] and all(torch.equal(a, b) for a, b in
                                                zip(after[1:], before[1][1:]))
        assert torch.equal(cache[0].ssm_state, before[0][1])


# ====================================================================== decoding without host syncs

@pytest.mark.parametrize("b", [1, 8, 32])
def test_decode_step_equals_forward_bit_for_bit_and_the_chunked_forward(b):
    """The lean step generate uses (no checks) == the checked forward through a cache, bit for bit;
    and token-by-token == the whole sequence, for batch 1, 8 and 32."""
    model = _lm(seed=50, ngroups=2, d_intermediate=24)
    ids = torch.randint(0, 30, (b, 9), generator=_g(b))
    with torch.no_grad():
        full = model(ids)
        lean, checked = model.allocate_inference_cache(b), model.allocate_inference_cache(b)
        model(ids[:, :4], cache=lean)
        model(ids[:, :4], cache=checked)
        for t in range(4, 9):
            a = model._decode(ids[:, t], lean)
            c = model(ids[:, t:t + 1], cache=checked)[:, 0]
            assert torch.equal(a, c)
            torch.testing.assert_close(a, full[:, t], rtol=0, atol=1e-12)
    assert all(torch.equal(x.ssm_state, y.ssm_state) for x, y in zip(lean, checked))


def test_static_buffer_step_equals_the_eager_step():
    """The CUDA-graph step's static buffers (ids in, logits out, caches updated in place), run on
    a CPU, give the eager step's logits and caches token after token; cuda_graph=True is refused
    off CUDA and for hybrid models."""
    model = _lm(seed=51)
    ids = torch.randint(0, 30, (3, 5), generator=_g(52))
    with torch.inference_mode():
        static_cache, eager_cache = model.allocate_inference_cache(3), \
            model.allocate_inference_cache(3)
        model(ids, cache=static_cache)
        model(ids, cache=eager_cache)
        step = mamba2._StaticDecode(model, static_cache, 3)
        tokens = ids[:, -1]
        for _ in range(6):
            got, want = step(tokens), model._decode(tokens, eager_cache)
            assert torch.equal(got, want)
            assert all(torch.equal(a.ssm_state, b.ssm_state) and
                       torch.equal(a.conv_state, b.conv_state)
                       for a, b in zip(static_cache, eager_cache))
            tokens = want[:, :37].argmax(-1)
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)
    hybrid = _hybrid(seed=53)
    with pytest.raises(ValueError, match="cuda_graph"):
        mamba2._StaticDecode(hybrid, hybrid.allocate_inference_cache(1), 1)


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=4, top_p=0.9, temperature=0.8,
                                             repetition_penalty=1.3)], ids=["greedy", "sampled"])
def test_decoding_loop_never_synchronises_with_the_host(monkeypatch, kw):
    """After the prompt's call, Tensor.item / tolist / __bool__ raise: generation (no eos, no
    streamer) still runs to the end, so no step waits for the device."""
    model = _lm(seed=56)
    ids = torch.randint(0, 30, (2, 5), generator=_g(57))
    want = model.generate(ids, max_new_tokens=6, generator=torch.Generator().manual_seed(1), **kw)
    real_forward = type(model).forward

    def forward_then_forbid(self, *a, **k):
        out = real_forward(self, *a, **k)
        for name in ("item", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, _forbidden(name))
        return out
    monkeypatch.setattr(type(model), "forward", forward_then_forbid)
    got = model.generate(ids, max_new_tokens=6, generator=torch.Generator().manual_seed(1), **kw)
    monkeypatch.undo()
    assert torch.equal(got, want)


def _forbidden(name):
    def method(*a, **k):
        raise AssertionError(f"Tensor.{name} called inside the decoding loop (a host sync)")
    return method


def test_bench_decode_reports_the_bound_and_hybrid_latency(tmp_path):
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "decode", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())["results"]["decode"]
    assert {p["batch"] for p in res["steps"]} >= {1, 8}
    assert all(p["step_over_floor_with_state"] > 0 for p in res["steps"])
    assert len(res["hybrid"]["contexts"]) == len(res["contexts"])
    assert res["generate"]["same_tokens"] is True
