"""Tests of the language model, checkpoints, generation and command line of mamba2.py.

Oracles: transformers' Mamba2ForCausalLM (an independent implementation of the same model), transformers'
logits processors, the model's own full forward (for caches, packing and generation), and hand-written
rules (official key names, GatedMLP rounding, CTRL repetition penalty). Tiny models only; no network.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import mamba2
from mamba2 import Mamba2Config, Mamba2LMHeadModel, Mamba2Model, Mamba2ForSequenceClassification


# ============================================================================================ helpers

_LM_VOCAB = 100


def _lm_config(**kw) -> Mamba2Config:
    """d_model 32, 2 layers, d_state 8, headdim 8 (8 heads), chunks of 16, vocab 100 padded to 112."""
    base = dict(d_model=32, n_layer=2, d_state=8, headdim=8, expand=2, d_conv=4, chunk_size=16,
                vocab_size=_LM_VOCAB, pad_vocab_size_multiple=16)
    base.update(kw)
    return Mamba2Config(**base)


@torch.no_grad()
def _lm_randomize(model: torch.nn.Module, seed: int = 0, emb_std: float = 0.3) -> torch.nn.Module:
    """Make every parameter matter: norms and D away from 1, a spread of step sizes, O(1) logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        def rnd(lo, hi):
            return (torch.rand(p.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(p.dtype)
        if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith("norm2.weight") \
                or name.endswith(".D"):
            p.copy_(rnd(0.5, 1.5))
        elif name.endswith("dt_bias"):
            p.copy_(rnd(-3.0, 0.5))
        elif name.endswith("conv1d.bias"):
            p.copy_(rnd(-0.3, 0.3))
        elif "embedding" in name or "embeddings" in name or name.startswith("lm_head"):
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * emb_std).to(p.dtype))
    return model


def _lm_model(dtype=torch.float64, seed=0, **kw) -> Mamba2LMHeadModel:
    torch.manual_seed(seed)
    return _lm_randomize(Mamba2LMHeadModel(_lm_config(**kw), dtype=dtype), seed=seed).eval()


def _lm_ids(b, l, seed=0, high=_LM_VOCAB):
    return torch.randint(0, high, (b, l), generator=torch.Generator().manual_seed(seed))


def _lm_hf_model(g=1, tie=False, seed=0, vocab=_LM_VOCAB, hidden=64, heads=8, head_dim=16, state=16,
                 chunk=16, layers=2):
    import transformers
    cfg = transformers.Mamba2Config(hidden_size=hidden, num_hidden_layers=layers, state_size=state,
                                    head_dim=head_dim, num_heads=heads, n_groups=g, expand=2, conv_kernel=4,
                                    chunk_size=chunk, vocab_size=vocab, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.Mamba2ForCausalLM(cfg).eval()


def _lm_official_keys(n_layer: int, d_intermediate: int) -> set:
    """The state-dict names of mamba_ssm's MambaLMHeadModel with Mamba2 mixers (written out by hand)."""
    keys = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(n_layer):
        pre = f"backbone.layers.{i}."
        keys |= {pre + "norm.weight", pre + "mixer.in_proj.weight", pre + "mixer.conv1d.weight",
                 pre + "mixer.conv1d.bias", pre + "mixer.dt_bias", pre + "mixer.A_log", pre + "mixer.D",
                 pre + "mixer.norm.weight", pre + "mixer.out_proj.weight"}
        if d_intermediate > 0:
            keys |= {pre + "norm2.weight", pre + "mlp.fc1.weight", pre + "mlp.fc2.weight"}
    return keys


def _lm_write_official(directory: Path, model: Mamba2LMHeadModel) -> dict:
    """Write config.json + pytorch_model.bin as mamba_ssm does (lm_head stored even when tied)."""
    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "d_model": cfg.d_model, "d_intermediate": cfg.d_intermediate, "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
                    "headdim": cfg.headdim, "ngroups": cfg.ngroups, "chunk_size": cfg.chunk_size},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": cfg.tie_embeddings,
    }
    (directory / "config.json").write_text(json.dumps(config))
    ours = model.state_dict()
    state = {k: ours[k].detach().clone() for k in sorted(_lm_official_keys(cfg.n_layer, cfg.d_intermediate))}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    return state


# ============================================================================ 1. checkpoints: transformers

@pytest.mark.parametrize("g,tie", [(1, False), (1, True), (2, False), (2, True)])
def test_transformers_checkpoint_logits_and_greedy_generate(tmp_path, g, tie):
    hf = _lm_randomize(_lm_hf_model(g=g, tie=tie, seed=g), seed=10 + g).double()
    hf.save_pretrained(tmp_path)
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert ours.dtype == torch.float64
    assert ours.config.ngroups == g and ours.config.tie_embeddings == tie
    assert ours.config.d_model == 64 and ours.config.nheads == 8 and ours.config.d_state == 16
    for l in (1, 7, 37):
        ids = _lm_ids(2, l, seed=l)
        with torch.no_grad():
            want = hf(ids).logits.double()
            got = ours(ids)
        assert got.shape[:2] == (2, l) and got.shape[-1] >= _LM_VOCAB
        # transformers runs parts of the block in fp32 even for a fp64 model
        torch.testing.assert_close(got[..., :_LM_VOCAB], want, rtol=1e-4, atol=1e-4)
    prompt = _lm_ids(2, 5, seed=99)
    # an explicit mask: transformers would otherwise take prompt tokens equal to pad_token_id for padding
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                       eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.pad_token_id)
    got = ours.generate(prompt, max_new_tokens=10, eos_token_id=hf.config.eos_token_id,
                        pad_token_id=hf.config.pad_token_id)
    assert torch.equal(got, want)


def test_transformers_sharded_checkpoint(tmp_path):
    hf = _lm_randomize(_lm_hf_model(g=2, tie=False, seed=3), seed=4)
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
    ids = _lm_ids(2, 21, seed=5)
    with torch.no_grad():
        want = hf(ids).logits
        got = sharded(ids)
    assert torch.equal(got, whole(ids))
    torch.testing.assert_close(got[..., :_LM_VOCAB], want, rtol=1e-4, atol=1e-4)


# ============================================================================== 1. checkpoints: mamba_ssm

@pytest.mark.parametrize("tie,d_intermediate,g", [(True, 0, 1), (False, 0, 2), (True, 40, 2), (False, 40, 1)])
def test_official_checkpoint_reproduces_logits(tmp_path, tie, d_intermediate, g):
    src = _lm_model(dtype=torch.float32, seed=7, tie_embeddings=tie, d_intermediate=d_intermediate, ngroups=g)
    assert set(src.state_dict()) == _lm_official_keys(2, d_intermediate)
    state = _lm_write_official(tmp_path, src)
    if d_intermediate:   # official GatedMLP: hidden rounded up to a multiple of 128, fc1 holds value and gate
        assert state["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 32)
        assert state["backbone.layers.0.mlp.fc2.weight"].shape == (32, 128)
    assert state["backbone.embedding.weight"].shape == (112, 32)
    assert state["backbone.layers.1.mixer.in_proj.weight"].shape == (2 * 64 + 2 * g * 8 + 8, 32)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.d_intermediate == d_intermediate and loaded.config.ngroups == g
    assert loaded.config.tie_embeddings == tie and loaded.config.padded_vocab_size == 112
    ids = _lm_ids(3, 29, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))


@pytest.mark.parametrize("tie,g", [(True, 1), (False, 2)])
def test_official_checkpoint_matches_transformers_oracle(tmp_path, tie, g):
    import transformers
    src = _lm_model(dtype=torch.float32, seed=8, tie_embeddings=tie, ngroups=g)
    state = _lm_write_official(tmp_path, src)
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    # the same weights in transformers' implementation (its vocabulary is the padded one, 112)
    hf = _lm_hf_model(g=g, tie=tie, vocab=112, hidden=32, heads=8, head_dim=8, state=8)
    renamed = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state.items()}
    result = hf.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if not (tie and k == "lm_head.weight")]
    assert torch.equal(hf.lm_head.weight, state["lm_head.weight"])
    for l in (1, 7, 37):
        ids = _lm_ids(2, l, seed=20 + l)
        with torch.no_grad():
            want = hf(ids).logits
            got = loaded(ids)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


# ============================================================================ 1. checkpoints: round trip

@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trip_and_bfloat16(tmp_path, tie):
    src = _lm_model(dtype=torch.float32, seed=11, tie_embeddings=tie, ngroups=2, d_intermediate=24,
                    dt_limit=(0.0, 2.0))
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
    ids = _lm_ids(2, 19, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids), src(ids))

    bf = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    c = bf.state_dict()
    assert c.keys() == a.keys()
    for k in a:
        assert c[k].dtype == torch.bfloat16, k
        assert torch.equal(c[k], a[k].to(torch.bfloat16)), k
    assert (bf.lm_head.weight is bf.backbone.embedding.weight) == tie
    with torch.no_grad():
        full, low = src(ids), bf(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() <= 0.1 * full.abs().max()


# ================================================================================= 1. checkpoints: errors

def _lm_saved(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    _lm_model(dtype=torch.float32, seed=12, tie_embeddings=False).save_pretrained(d)
    return d


def test_from_pretrained_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(ValueError, match="does not exist"):
        Mamba2LMHeadModel.from_pretrained(missing)


def test_from_pretrained_unknown_config_format(tmp_path):
    d = _lm_saved(tmp_path)
    (d / "config.json").write_text(json.dumps({"architectures": ["SomethingElse"], "width": 32}))
    with pytest.raises(ValueError, match="format"):
        Mamba2LMHeadModel.from_pretrained(d)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_from_pretrained_tensor_mismatch_names_the_tensor(tmp_path, problem):
    from safetensors.torch import load_file, save_file
    d = _lm_saved(tmp_path)
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
    with pytest.raises(ValueError) as info:
        Mamba2LMHeadModel.from_pretrained(d)
    assert name in str(info.value)


def test_from_pretrained_truncated_safetensors(tmp_path):
    d = _lm_saved(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        Mamba2LMHeadModel.from_pretrained(d)


def test_from_pretrained_truncated_bin(tmp_path):
    _lm_write_official(tmp_path, _lm_model(dtype=torch.float32, seed=13))
    f = tmp_path / "pytorch_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


class _LmPayload:
    """Unpickling this object runs code that creates `marker` (stands for an arbitrary attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_from_pretrained_refuses_malicious_pickle(tmp_path):
    model = _lm_model(dtype=torch.float32, seed=14)
    d = tmp_path / "evil"
    state = _lm_write_official(d, model)
    marker = tmp_path / "marker_from_checkpoint"
    torch.save({**state, "backbone.layers.0.mixer.D": _LmPayload(marker)}, d / "pytorch_model.bin")
    # the payload is live: unrestricted unpickling of the same kind of file does run it
    probe_marker = tmp_path / "marker_from_probe"
    torch.save({"x": _LmPayload(probe_marker)}, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert probe_marker.exists()
    with pytest.raises(ValueError):
        Mamba2LMHeadModel.from_pretrained(d)
    assert not marker.exists()


# ================================================================================================ 2. forward

def test_num_last_tokens_equals_full_forward():
    model = _lm_model(ngroups=2)
    ids = _lm_ids(2, 23, seed=3)
    with torch.no_grad():
        full = model(ids)
        assert torch.equal(model(ids, num_last_tokens=0), full)
        for k in (1, 5, 23):
            last = model(ids, num_last_tokens=k)
            assert last.shape == (2, k, 112)
            torch.testing.assert_close(last, full[:, -k:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(ids, num_last_tokens=-1)


@pytest.mark.parametrize("kw", [dict(ngroups=2), dict(d_intermediate=24, tie_embeddings=False)])
def test_cache_in_pieces_equals_full_forward(kw):
    model = _lm_model(**kw)
    l = 270   # longer than one CPU block (256 tokens), not a multiple of the chunk length
    ids = _lm_ids(2, l, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2)
        assert len(cache) == 2
        pieces = []
        for start, end in [(0, 1), (1, 6), (6, 263)]:
            pieces.append(model(ids[:, start:end], cache=cache))
        for t in range(263, l):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
        got = torch.cat(pieces, dim=1)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=0, atol=1e-10)


def test_seq_idx_packing_equals_separate_runs():
    model = _lm_model(ngroups=2, d_intermediate=24)
    lengths = [5, 19, 1, 12]            # segments cross chunk boundaries (chunks of 16)
    seqs = [_lm_ids(1, n, seed=30 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        got = model(packed, seq_idx=seq_idx)
        want = torch.cat([model(s) for s in seqs], dim=1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        # two rows packed differently in one batch
        other = torch.cat([seqs[3], seqs[1], seqs[0], seqs[2]], dim=1)
        idx2 = torch.cat([torch.full((1, n), i, dtype=torch.int32)
                          for i, n in enumerate([12, 19, 5, 1])], dim=1)
        got2 = model(torch.cat([packed, other]), seq_idx=torch.cat([seq_idx, idx2]))
        want2 = torch.cat([model(s) for s in (seqs[3], seqs[1], seqs[0], seqs[2])], dim=1)
    torch.testing.assert_close(got2[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got2[1], want2[0], rtol=0, atol=1e-10)


# ============================================================================================= 3. generation

@pytest.fixture(scope="module")
def lm_gen_model():
    return _lm_model(seed=21, ngroups=2)


def _lm_left_pad(prompts, pad_value):
    l = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), l), pad_value, dtype=torch.long)
    mask = torch.zeros(len(prompts), l, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, l - p.shape[1]:] = p[0]
        mask[i, l - p.shape[1]:] = 1
    return ids, mask


@pytest.mark.parametrize("penalty", [1.0, 1.7])
def test_left_padded_batch_equals_each_prompt_alone(lm_gen_model, penalty):
    model = lm_gen_model
    prompts = [_lm_ids(1, n, seed=40 + n) for n in (3, 7, 1)]
    alone = [model.generate(p, max_new_tokens=6, repetition_penalty=penalty) for p in prompts]
    # pad with a real token id, the one the shortest prompt continues with: padding must be ignored, also by
    # the repetition penalty (were the pads counted as seen, that token would be penalised in the last row)
    pad_value = int(alone[2][0, 1])
    ids, mask = _lm_left_pad(prompts, pad_value=pad_value)
    out = model.generate(ids, max_new_tokens=6, attention_mask=mask, repetition_penalty=penalty)
    assert out.shape == (3, ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, ids.shape[1]:], alone[i][0, p.shape[1]:]), i


def test_max_new_tokens_zero_returns_prompt(lm_gen_model):
    ids = _lm_ids(2, 4, seed=1)
    assert torch.equal(lm_gen_model.generate(ids, max_new_tokens=0), ids)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0), dict(temperature=0.0),
                                dict(temperature=0.0, top_k=50, top_p=0.9), dict(temperature=1e-7)])
def test_degenerate_sampling_equals_greedy(lm_gen_model, kw):
    model = lm_gen_model
    ids = _lm_ids(2, 6, seed=50)
    greedy = model.generate(ids, max_new_tokens=10)
    # precondition for the tiny-temperature case: the top-2 logits along the greedy path are well apart
    with torch.no_grad():
        logits = model(greedy[:, :-1])[:, ids.shape[1] - 1:, :_LM_VOCAB].float()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        sampled = model.generate(ids, max_new_tokens=10, do_sample=True, generator=g, **kw)
        assert torch.equal(sampled, greedy), (kw, seed)


def test_greedy_with_repetition_penalty_matches_reference(lm_gen_model):
    """Teacher-forced oracle: each greedy token is the argmax of the CTRL-penalised full-forward logits."""
    model, penalty = lm_gen_model, 2.5
    ids = _lm_ids(2, 8, seed=60)
    out = model.generate(ids, max_new_tokens=12, repetition_penalty=penalty)
    plain = model.generate(ids, max_new_tokens=12)
    with torch.no_grad():
        logits = model(out[:, :-1])[..., :_LM_VOCAB].float()
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
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, _LM_VOCAB, generator=gen) * 2
    seen = torch.rand(4, _LM_VOCAB, generator=gen) < 0.2
    before = logits.softmax(-1)
    processed = mamba2.process_logits(logits, seen, repetition_penalty=1.5)
    after = processed.softmax(-1)
    assert (processed[seen] < logits[seen]).all()           # every seen logit moves down (none is exactly 0)
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


def test_seeded_sampling_reproducible_and_seed_dependent(lm_gen_model):
    ids = _lm_ids(2, 5, seed=70)

    def sample(seed):
        return lm_gen_model.generate(ids, max_new_tokens=15, do_sample=True, temperature=1.3,
                                     generator=torch.Generator().manual_seed(seed))
    a, b = sample(123), sample(123)
    assert torch.equal(a, b)
    others = [sample(s) for s in (1, 2)]
    assert all(not torch.equal(a, o) for o in others)


def test_top_k_sampling_distribution(lm_gen_model):
    model, n = lm_gen_model, 2000
    prompt = _lm_ids(1, 6, seed=80)
    with torch.no_grad():
        first = model(prompt)[0, -1, :_LM_VOCAB].float()
    top = first.topk(2)
    p_best = top.values.softmax(-1)[0].item()
    assert 0.05 < p_best < 0.95     # both tokens have a real chance on this prompt
    out = model.generate(prompt.expand(n, -1), max_new_tokens=1, do_sample=True, top_k=2,
                         generator=torch.Generator().manual_seed(0))
    tokens = out[:, -1]
    assert set(tokens.tolist()) <= set(top.indices.tolist())
    freq = (tokens == top.indices[0]).double().mean().item()
    assert abs(freq - p_best) < 5 * math.sqrt(p_best * (1 - p_best) / n)


def test_sampling_distribution_matches_transformers_warpers(lm_gen_model):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    model, n = lm_gen_model, 3000
    prompt = _lm_ids(1, 6, seed=81)
    with torch.no_grad():
        first = model(prompt)[:, -1, :_LM_VOCAB].float()
    scores = TopPLogitsWarper(0.9)(prompt, TemperatureLogitsWarper(0.8)(prompt, first.clone()))
    expected = scores.softmax(-1)[0]
    out = model.generate(prompt.expand(n, -1), max_new_tokens=1, do_sample=True, temperature=0.8, top_p=0.9,
                         generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(out[:, -1], minlength=_LM_VOCAB).double() / n
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
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, _LM_VOCAB, generator=gen) * 3
    ids = torch.randint(0, _LM_VOCAB, (4, 12), generator=gen)
    seen = torch.zeros(4, _LM_VOCAB, dtype=torch.bool)
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
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-6, atol=1e-6)


def _lm_first_eos_rule(tokens, eos, pad):
    """Reference: keep tokens up to and including the first eos, pad afterwards; None when no eos."""
    out, done = [], False
    for t in tokens:
        out.append(pad if done else t)
        done = done or t in eos
    return out, done


@pytest.mark.parametrize("eos_kind", ["int", "list"])
def test_eos_stops_rows_pads_and_stops_early(lm_gen_model, eos_kind):
    model = lm_gen_model
    ids = _lm_ids(3, 5, seed=90)
    free = model.generate(ids, max_new_tokens=14)[:, 5:]          # no eos: the reference paths
    if eos_kind == "int":
        eos = int(free[0, 3])       # row 0 finishes at step 3 at the latest; others maybe never
        eos_set, pad = {eos}, 99
        kwargs = dict(eos_token_id=eos, pad_token_id=pad)
    else:
        eos = [int(free[0, 2]), int(free[1, 4]), int(free[2, 1])]   # every row finishes by step 4
        eos_set, pad = set(eos), eos[0]                               # default pad: the first eos id
        kwargs = dict(eos_token_id=eos)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model.generate(ids, max_new_tokens=14, **kwargs)
    finally:
        hook.remove()
    rows = [_lm_first_eos_rule(free[i].tolist(), eos_set, pad) for i in range(3)]
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


def test_streamer_receives_prompt_then_each_token(lm_gen_model):
    class Recorder:
        def __init__(self):
            self.events = []

        def put(self, value):
            self.events.append(("put", value.clone()))

        def end(self):
            self.events.append(("end", None))

    ids = _lm_ids(2, 4, seed=95)
    rec = Recorder()
    out = lm_gen_model.generate(ids, max_new_tokens=7, do_sample=True, top_k=10,
                                generator=torch.Generator().manual_seed(0), streamer=rec)
    kinds = [k for k, _ in rec.events]
    assert kinds == ["put"] * 8 + ["end"]
    assert torch.equal(rec.events[0][1], ids)
    steps = [v for _, v in rec.events[1:-1]]
    assert all(v.shape == (2,) for v in steps)
    assert torch.equal(torch.cat([ids] + [v[:, None] for v in steps], dim=1), out)
    # and when all rows stop early at an eos
    rec2 = Recorder()
    free = lm_gen_model.generate(ids, max_new_tokens=7)
    eos = [int(free[0, 5]), int(free[1, 5])]
    out2 = lm_gen_model.generate(ids, max_new_tokens=7, eos_token_id=eos, pad_token_id=0, streamer=rec2)
    assert [k for k, _ in rec2.events].count("end") == 1 and rec2.events[-1][0] == "end"
    assert torch.equal(torch.cat([rec2.events[0][1]] + [v[:, None] for _, v in rec2.events[1:-1]], dim=1), out2)


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), "attention_mask"),
])
def test_generate_argument_validation(lm_gen_model, kw, name):
    ids = _lm_ids(2, 4, seed=7)
    with pytest.raises(ValueError, match=name):
        lm_gen_model.generate(ids, **{"max_new_tokens": 3, **kw})


@pytest.mark.parametrize("bad", [-1, 112, 1000])
def test_generate_rejects_out_of_range_ids(lm_gen_model, bad):
    ids = _lm_ids(2, 4, seed=7)
    ids[1, 2] = bad
    with pytest.raises(ValueError):
        lm_gen_model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError):
        lm_gen_model(ids)


# ================================================================================ 4. backbone, classifier

def test_backbone_hidden_states_are_lm_pre_head(lm_gen_model):
    model = lm_gen_model
    ids = _lm_ids(2, 13, seed=8)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        hook.remove()
    backbone = Mamba2Model(model.config, dtype=torch.float64)
    backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        hidden = backbone(ids)
    assert hidden.shape == (2, 13, 32)
    assert torch.equal(hidden, captured[0])
    assert torch.equal(model.lm_head(hidden), logits)


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_sequence_classification_padding_equals_alone(side):
    torch.manual_seed(0)
    clf = _lm_randomize(Mamba2ForSequenceClassification(_lm_config(ngroups=2), num_labels=3,
                                                         dtype=torch.float64), seed=9).eval()
    seqs = [_lm_ids(1, n, seed=100 + n) for n in (4, 21, 13)]
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
    torch.testing.assert_close(alone, manual, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-10)


# ============================================================================================ 5. command line

def test_command_line_greedy_generation(tmp_path):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = ("[UNK] [PAD] [EOS] the a cat dog bird sat ran flew on under over mat house tree and then "
             "big small red blue green quick slow happy sad one two three four five").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")
    d = tmp_path / "cli_model"
    torch.manual_seed(0)
    model = _lm_randomize(Mamba2LMHeadModel(_lm_config(vocab_size=len(words), tie_embeddings=False,
                                                       pad_vocab_size_multiple=8)), seed=3, emb_std=1.0)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0     # special tokens never win: the continuation is 5 real words
    model.save_pretrained(d)
    fast.save_pretrained(d)

    prompt = "the quick cat sat on"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "mamba2.py", prompt, "--model", str(d), "--max-new-tokens", "5",
                           "--seed", "0", "--temperature", "0", "--device", "cpu"],
                          cwd=Path(mamba2.__file__).resolve().parent, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the same generation in process: CLI defaults (repetition penalty 1.1), greedy because temperature is 0
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
