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
