import pytest
import torch

import mamba2


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


def _lm(attn=False, seed=0):
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
    model = _lm(attn)
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
