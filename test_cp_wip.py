"""Context parallelism (cp_group): one sequence split across 2 and 4 gloo processes on CPU gives
the single-process whole exactly (float64, 1e-12): outputs, final states, the loss, the parameter
gradients summed over the ranks and each rank's input gradients; with packing across the rank
boundaries, the memory-efficient path on and off, learned initial states, hybrid attention layers,
and a prefill whose last-rank cache is one process's. Each K runs one group of processes doing
every check; the test asserts what they report."""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent
F64 = torch.float64


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
