"""A short tour of the Mamba-2 block in mamba2.py. Each step prints the check that shows it holds.

    python demo_features.py

Runs in a few seconds on a CPU. Every "ok" below is an assertion: the script exits non-zero if one
fails.
"""

import torch

from mamba2 import InferenceCache, Mamba2, Mamba2Config, ssd

torch.manual_seed(0)
DT = torch.float64  # exact comparisons; the library runs in any dtype


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10):
    err = (got - want).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.1g}"
    print(f"  ok  {name:<58s} max error {err:.1e}")


def small(**kw) -> Mamba2:
    cfg = Mamba2Config(d_model=32, d_state=8, headdim=8, chunk_size=16, **kw)
    return Mamba2(cfg, dtype=DT)


print("1. A layer, official keywords (only the import differs from mamba_ssm's README)")
layer = Mamba2(d_model=64, d_state=16, d_conv=4, expand=2, headdim=16)
y = layer(torch.randn(2, 100, 64))
n_params = sum(p.numel() for p in layer.parameters())
print(f"  ok  (2, 100, 64) -> {tuple(y.shape)}, {n_params} parameters")

print("2. Any length: the chunk size only tiles the work")
block, u = small(ngroups=2), torch.randn(2, 53, 32, dtype=DT)
want = block(u)
for q in (1, 5, 64):
    block.config.chunk_size = q
    check(f"chunk_size {q} == chunk_size 16 at length 53", block(u), want)
block.config.chunk_size = 16

print("3. Groups: heads share B and C in ngroups groups; the gated norm is grouped the same way")
print(f"  ok  nheads={block.config.nheads}, ngroups={block.config.ngroups}, "
      f"norm group_size={block.norm.group_size}")

print("4. Initial and final states: a state handed over is the whole history")
x = torch.randn(1, 40, 4, 8, dtype=DT)
dt = torch.rand(1, 40, 4, dtype=DT) * 0.1
A = -torch.rand(4, dtype=DT)
B, C = torch.randn(1, 40, 2, 6, dtype=DT), torch.randn(1, 40, 2, 6, dtype=DT)
y_all, h_all = ssd(x, dt, A, B, C, chunk_size=8, return_final_states=True)
y1, h1 = ssd(x[:, :17], dt[:, :17], A, B[:, :17], C[:, :17], chunk_size=8, return_final_states=True)
y2, h2 = ssd(x[:, 17:], dt[:, 17:], A, B[:, 17:], C[:, 17:], chunk_size=8, initial_states=h1,
             return_final_states=True)
check("scan(first 17) -> state -> scan(rest) == scan(all)", torch.cat([y1, y2], 1), y_all)
check("final states agree", h2, h_all)

print("5. Cache stepping: one call, pieces of any size, or token by token give the same result")
cache = InferenceCache.alloc(2, block.config, dtype=DT)
pieces = [block(u[:, a:b], cache=cache) for a, b in [(0, 20), (20, 21), (21, 53)]]
check("prompt in pieces 20 + 1 + 32 == one call", torch.cat(pieces, 1), want)
cache.reset()
steps = [block(u[:, t:t + 1], cache=cache) for t in range(53)]   # constant time per token
check("53 single-token steps == one call", torch.cat(steps, 1), want)

print("6. Packed sequences: segments never see each other (SSM state and convolution)")
lengths = [7, 1, 30, 15]
seqs = [torch.randn(1, n, 32, dtype=DT) for n in lengths]
alone = torch.cat([block(s) for s in seqs], 1)
cu_seqlens = torch.tensor([0, 7, 8, 38, 53])
check("cu_seqlens packing == each sequence alone",
      block(torch.cat(seqs, 1), cu_seqlens=cu_seqlens), alone)
seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None]
check("seq_idx packing == each sequence alone", block(torch.cat(seqs, 1), seq_idx=seq_idx), alone)

print("7. dt_limit clamps the step size; learnable initial states start every sequence")
clamped = small(dt_limit=(0.01, 0.02), learnable_init_states=True)
with torch.no_grad():
    clamped.init_states.normal_()
h0 = clamped.init_states.expand(2, -1, -1, -1)
check("learned init_states == the same passed as initial_states",
      clamped(u), clamped(u, initial_states=h0.clone()))
wide = small(dt_limit=(0.0, float("inf")))
wide.load_state_dict({k: v for k, v in clamped.state_dict().items() if k != "init_states"})
wide.dt_bias.data.fill_(10.0)                     # softplus(10 + ...) ~ 10: far above the limit
clamped.dt_bias.data.fill_(10.0)
diff = (wide(u, initial_states=h0) - clamped(u)).abs().max().item()
assert diff > 1e-3, "dt_limit had no effect"
print(f"  ok  clamping dt to [0.01, 0.02] changes the output by {diff:.2f}")

print("8. Memory-efficient training path: same numbers, less memory")
plain, lean = small(use_mem_eff_path=False), small(use_mem_eff_path=True)
lean.load_state_dict(plain.state_dict())
long_u = torch.randn(1, 1024, 32, dtype=DT, requires_grad=True)


def saved_bytes(module):
    """Bytes of the tensors autograd keeps for backward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(long_u)
    return out, sum(storages.values())


(out_plain, bytes_plain), (out_lean, bytes_lean) = saved_bytes(plain), saved_bytes(lean)
check("outputs identical", out_lean, out_plain, 0.0)
g_plain = torch.autograd.grad(out_plain.square().sum(), [long_u, *plain.parameters()])
g_lean = torch.autograd.grad(out_lean.square().sum(), [long_u, *lean.parameters()])
check("gradients identical", torch.stack([(a - b).abs().max() for a, b in zip(g_plain, g_lean)]),
      torch.zeros(len(g_plain), dtype=DT), 0.0)
assert bytes_lean < 0.6 * bytes_plain
print(f"  ok  saved for backward: {bytes_lean / 2**20:.1f} MiB vs {bytes_plain / 2**20:.1f} MiB "
      f"({bytes_lean / bytes_plain:.0%})")

print("9. d_ssm < d_inner: the channels outside the SSM take a gated-MLP branch, as official")
part = small(d_ssm=32)
print(f"  ok  d_inner={part.config.d_inner}, d_ssm={part.config.d_ssm}, d_mlp={part.config.d_mlp}; "
      f"output {tuple(part(u).shape)}")

print(f"\nall checks passed (mamba2.py, torch {torch.__version__})")
