"""Mutation check of the test suite: plant plausible bugs in mamba2.py, one at a time, and make sure
the suite fails for each. A developer tool, not run in CI.

    python mutants.py                      # every mutant, every test file (takes a while)
    python mutants.py --only gated_mlp_halves_swapped --only loss_ignores_incoming_grad
    python mutants.py -k "loss or mlp" --timeout 300
    python mutants.py --list               # the mutants, checked against the current mamba2.py

Each mutant is (name, an exact snippet of mamba2.py, its replacement). At startup every snippet
must occur exactly once in the working tree's mamba2.py, so the list stays honest as the file
changes (update the snippet when it stops matching). The working tree is never modified: the repo
is copied (`git archive HEAD`, plus the working tree's mamba2.py and test files) into a temporary
directory, and each mutant is applied to a copy there; then

    python -m pytest -q -x -p no:cacheprovider <test files> [-k ...]

runs in that copy. A mutant is "killed" when pytest fails, "survived" when it passes, "timeout"
when it runs past --timeout. The table names the first failing test; the exit status is 1 when a
mutant survived or timed out (2 for a setup problem).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent
TARGET = "mamba2.py"
# the suite (one file; -x stops at the first failing test)
DEFAULT_TESTS = ("test_mamba2.py",)


class Mutant(NamedTuple):
    name: str
    snippet: str
    replacement: str


M = Mutant
MUTANTS = [
    # ---- the ten bugs a review planted that survived the earlier suite
    M("loss_ignores_incoming_grad",
      "        dhidden = None if dhidden is None else dhidden * dloss.to(dhidden.dtype)\n"
      "        dweight = None if dweight is None else (dweight * dloss).to(ctx.weight_dtype)\n",
      "        dhidden = None if dhidden is None else dhidden\n"
      "        dweight = None if dweight is None else dweight.to(ctx.weight_dtype)\n"),
    M("gated_mlp_halves_swapped",
      "        return self.fc2(y * F.silu(gate))",
      "        return self.fc2(gate * F.silu(y))"),
    M("save_drops_norm_before_gate",
      "        if value != defaults[name]:\n            ssm_cfg[name]",
      "        if value != defaults[name] and name != \"norm_before_gate\":\n"
      "            ssm_cfg[name]"),
    M("save_drops_learnable_init_states",
      "        if value != defaults[name]:\n            ssm_cfg[name]",
      "        if value != defaults[name] and name != \"learnable_init_states\":\n"
      "            ssm_cfg[name]"),
    M("cli_ignores_top_k",
      "                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,",
      "                    top_k=0, top_p=args.top_p, min_p=args.min_p,"),
    M("cli_ignores_min_p",
      "                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,",
      "                    top_k=args.top_k, top_p=args.top_p, min_p=0.0,"),
    M("residual_not_kept_in_fp32",
      "        return hidden, _cast(residual, torch.float32) if self.residual_in_fp32 else "
      "residual",
      "        return hidden, residual"),
    M("lm_init_no_rescale",
      "                p /= math.sqrt(n_layer)",
      "                pass"),
    M("transformers_time_step_limit_key_misread",
      "    \"time_step_limit\": (\"dt_limit\", (0.0, math.inf)),",
      "    \"time_step_limits\": (\"dt_limit\", (0.0, math.inf)),"),
    M("streamer_prints_partial_characters",
      "        if text.endswith(\"\\ufffd\") and not final:",
      "        if False and not final:"),

    # ---- the scan and the convolution
    M("A_sign_flipped",
      "A=-torch.exp(_cast(A_log, _compute_dtype(A_log.dtype)))",
      "A=torch.exp(_cast(A_log, _compute_dtype(A_log.dtype)))"),
    M("conv_off_by_one",
      "        y = F.conv2d(xp[:, 1:].unsqueeze(1).permute(0, 3, 1, 2), taps, bias, groups=d)",
      "        y = F.conv2d(xp[:, :-1].unsqueeze(1).permute(0, 3, 1, 2), taps, bias, groups=d)"),
    M("conv_step_window_reversed",
      "    window = torch.cat([state[..., 1:], _cast(x, state.dtype).unsqueeze(-1)], dim=-1)",
      "    window = torch.cat([_cast(x, state.dtype).unsqueeze(-1), state[..., :-1]], dim=-1)"),
    M("conv_sees_other_segments",
      "        xk = torch.where(same, xp[:, k + 1:k + 1 + l], 0)",
      "        xk = xp[:, k + 1:k + 1 + l]"),
    M("conv_state_keeps_other_segments",
      "    new_state = torch.where((seg[:, -w:] == seq_idx[:, -1:]).unsqueeze(-1), new_state, 0)",
      "    new_state = new_state"),
    M("cumsum_exclusive",
      "        self.A_cumsum = torch.cumsum(dt_clean * A, dim=2)",
      "        self.A_cumsum = torch.cumsum(dt_clean * A, dim=2) - dt_clean * A"),
    M("state_passed_with_previous_chunk_decay",
      "        S = _pass_state(S, decay_chunk[:, i], None if drop is None else drop[:, i],",
      "        S = _pass_state(S, decay_chunk[:, i - 1], None if drop is None else drop[:, i],"),
    M("chunk_decay_not_cut_at_segments",
      "            decay_chunk = torch.where(self.carries_state, decay_chunk, 0)",
      "            decay_chunk = decay_chunk"),
    M("span_state_not_reset_at_segment_start",
      "    return torch.where(keep[:, None, None, None], state, fresh), conv_state",
      "    return state, conv_state"),
    M("dt_limit_high_ignored",
      "        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])",
      "        dt = dt.clamp(min=dt_limit[0])"),
    M("dt_limit_only_when_low_positive",
      "    if dt_limit[0] > 0.0 or dt_limit[1] != math.inf:",
      "    if dt_limit[0] > 0.0:"),
    M("D_has_hdim_transposed",
      "        D = self.D.view(cfg.nheads, cfg.headdim) if cfg.D_has_hdim else self.D",
      "        D = self.D.view(cfg.headdim, cfg.nheads).t() if cfg.D_has_hdim else self.D"),
    M("step_D_per_head_only",
      "        y = y.addcmul_(_cast(x, cdt), _cast(D, cdt) if D.dim() == 2 else "
      "_cast(D, cdt)[:, None])",
      "        y = y.addcmul_(_cast(x, cdt), _cast(D, cdt).mean(-1, keepdim=True) if D.dim() == 2 "
      "else _cast(D, cdt)[:, None])"),
    M("heads_to_groups_reversed",
      "        y, ssm_state = _ssd(x.unflatten(-1, (h, p)), dt, w.A, B.unflatten(-1, (g, n)),",
      "        y, ssm_state = _ssd(x.unflatten(-1, (h, p)), dt, w.A, "
      "B.unflatten(-1, (g, n)).flip(2),"),

    # ---- the norm and the block
    M("norm_before_gate_inverted",
      "    if gate is not None and not norm_before_gate:",
      "    if gate is not None and norm_before_gate:"),
    M("norm_not_grouped",
      "        y = _rms_norm_gated(y, z, w.norm_weight, w.norm_eps, w.d_ssm // g, "
      "w.norm_before_gate)",
      "        y = _rms_norm_gated(y, z, w.norm_weight, w.norm_eps, w.d_ssm, w.norm_before_gate)"),
    M("block_norm_eps_1e-6",
      "            self.norm = RMSNormGated(cfg.d_ssm, eps=1e-5, "
      "norm_before_gate=cfg.norm_before_gate,",
      "            self.norm = RMSNormGated(cfg.d_ssm, eps=1e-6, "
      "norm_before_gate=cfg.norm_before_gate,"),
    M("mlp_branch_halves_swapped",
      "        y = torch.cat([F.silu(z0) * x0, y], dim=-1)",
      "        y = torch.cat([F.silu(x0) * z0, y], dim=-1)"),
    M("mlp_after_the_first_norm",
      "            hidden, residual = self._add_norm(self.norm2, hidden, residual)",
      "            hidden, residual = self._add_norm(self.norm, hidden, residual)"),
    M("learned_state_not_restored_by_reset",
      "        if self.initial_ssm_state is None:\n            self.ssm_state.zero_()",
      "        if True:\n            self.ssm_state.zero_()"),
    M("scan_in_input_dtype",
      "    out_dtype, cdt = x.dtype, _compute_dtype(x.dtype)\n    x, dt, A, B, C, D,",
      "    out_dtype, cdt = x.dtype, x.dtype\n    x, dt, A, B, C, D,"),
    M("D_in_module_dtype",
      "        D_dtype = torch.promote_types(dtype or torch.get_default_dtype(), "
      "torch.get_default_dtype())",
      "        D_dtype = dtype"),
    M("lm_init_rescales_out_proj_only",
      "        if name.endswith(\"out_proj.weight\") or name.endswith(\"fc2.weight\"):",
      "        if name.endswith(\"out_proj.weight\"):"),

    # ---- attention layers
    M("rotary_position_ignores_segment_start",
      "        offset = None if cache is None else cache.length - start",
      "        offset = None if cache is None else cache.length"),
    M("rotary_layouts_swapped",
      "    x1, x2 = (turned[..., 0::2], turned[..., 1::2]) if interleaved else "
      "turned.chunk(2, dim=-1)",
      "    x1, x2 = (turned[..., 0::2], turned[..., 1::2]) if not interleaved else "
      "turned.chunk(2, dim=-1)"),
    M("gqa_heads_tiled_not_interleaved",
      "        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)",
      "        k, v = k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1)"),
    M("softmax_scale_ignored",
      "        self.softmax_scale = a[\"softmax_scale\"] or 1 / math.sqrt(self.head_dim)",
      "        self.softmax_scale = 1 / math.sqrt(self.head_dim)"),
    M("attention_always_causal",
      "                                         is_causal=causal and mask is None)",
      "                                         is_causal=mask is None)"),
    M("attention_mlp_halves_swapped",
      "            up, gate = mlp.chunk(2, dim=-1)",
      "            gate, up = mlp.chunk(2, dim=-1)"),

    # ---- the model, the loss, the classifier
    M("vocab_over_padded",
      "        return (self.vocab_size + m - 1) // m * m",
      "        return (self.vocab_size + m) // m * m"),
    M("loss_mean_over_ignored_tokens_too",
      "        scale = 1.0 / (valid.sum() if count is None else count).to(cdt)",
      "        scale = 1.0 / torch.tensor(float(n) if count is None else count, dtype=cdt)"),
    M("classifier_pools_first_real_token",
      "            last = l - 1 - mask.flip(1).int().argmax(1)",
      "            last = mask.int().argmax(1)"),

    # ---- checkpoints
    M("save_full_drops_norm_epsilon",
      "        out[\"norm_epsilon\"] = config.norm_epsilon",
      "        pass"),
    M("transformers_save_keeps_embedding_key",
      "            state = {(\"backbone.embeddings.weight\" if k == \"backbone.embedding.weight\" "
      "else k): v",
      "            state = {k: v"),
    M("transformers_export_unpadded_vocab",
      "        vocab_size=config.padded_vocab_size, hidden_act=\"silu\",",
      "        vocab_size=config.vocab_size, hidden_act=\"silu\","),
    M("transformers_conv_bias_key_misread",
      "    \"use_conv_bias\": (\"conv_bias\", True),",
      "    \"conv_bias\": (\"conv_bias\", True),"),
    M("transformers_read_with_vocab_padding",
      "    return Mamba2Config(**kw, pad_vocab_size_multiple=1, norm_before_gate=False)",
      "    return Mamba2Config(**kw, pad_vocab_size_multiple=16, norm_before_gate=False)"),
    M("official_pad_multiple_default_16",
      "    kw.setdefault(\"pad_vocab_size_multiple\", 8)",
      "    kw.setdefault(\"pad_vocab_size_multiple\", 16)"),
    M("load_dtype_always_fp32",
      "    target = dtype or max(counts, key=counts.get, default=torch.float32)",
      "    target = dtype or torch.float32"),

    # ---- generation
    M("top_p_strict_threshold",
      "        drop_sorted = cum <= 1 - top_p",
      "        drop_sorted = cum < 1 - top_p"),
    M("top_k_keeps_one_more",
      "        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]",
      "        kth = logits.topk(min(top_k + 1, logits.shape[-1]), dim=-1).values[..., -1:]"),
    M("min_p_on_logits",
      "        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, "
      "-math.inf)",
      "        logits = logits.masked_fill(logits < min_p * logits.max(-1, keepdim=True).values, "
      "-math.inf)"),
    M("temperature_multiplies",
      "        logits = logits / temperature",
      "        logits = logits * temperature"),
    M("repetition_penalty_sign_swapped",
      "        penalised = torch.where(logits < 0, logits * repetition_penalty,",
      "        penalised = torch.where(logits > 0, logits * repetition_penalty,"),
    M("repetition_penalty_forgets_generated_tokens",
      "            seen[torch.arange(b, device=seen.device), next_token.clamp(max=vocab - 1)] = "
      "True",
      "            pass"),
    M("eos_stops_when_any_row_finishes",
      "        if (eos and not unfinished.any()) or i == max_new_tokens - 1:",
      "        if (eos and not unfinished.all()) or i == max_new_tokens - 1:"),
    M("finished_rows_not_padded",
      "            next_token = torch.where(unfinished, next_token, "
      "torch.full_like(next_token, pad))",
      "            next_token = next_token"),
    M("vocab_padding_sampled_while_decoding",
      "        logits = step(next_token)[:, :vocab]",
      "        logits = step(next_token)"),
    M("left_padding_not_a_segment",
      "    seq_idx = None if mask is None or mask.all() else mask.int()",
      "    seq_idx = None"),
    M("attention_segment_start_off_by_one",
      "                                        cache.length + l - 1 - starts, start)",
      "                                        cache.length + l - starts, start)"),
    M("pad_default_not_the_first_eos",
      "        pad = eos[0] if eos else 0",
      "        pad = 0"),
    M("penalty_counts_left_padding",
      "        present = input_ids < vocab if mask is None else mask & (input_ids < vocab)",
      "        present = input_ids < vocab"),
    M("generates_one_token_too_many",
      "        if (eos and not unfinished.any()) or i == max_new_tokens - 1:",
      "        if (eos and not unfinished.any()) or i == max_new_tokens:"),
    M("loss_not_shifted",
      "            targets = F.pad(labels[:, 1:], (0, 1), value=-100)",
      "            targets = labels"),
    M("packed_segments_start_from_zeros",
      "                            S0=None if seq_idx is None else w.init_states)",
      "                            S0=None)"),
    M("residual_norm_eps_ignored",
      "        return RMSNormGated(config.d_model, eps=config.norm_epsilon, device=device, "
      "dtype=dtype)",
      "        return RMSNormGated(config.d_model, eps=1e-5, device=device, dtype=dtype)"),
    M("from_pretrained_ignores_dtype",
      "        sources, target = _checkpoint_sources(path, dtype=dtype)",
      "        sources, target = _checkpoint_sources(path, dtype=None)"),
    M("load_rounds_through_the_model_dtype",
      "        tensors = {name: source.read(device, expected[name].dtype)",
      "        tensors = {name: source.read(device, target).to(expected[name].dtype)"),
    M("cli_seed_ignored",
      "    generator = torch.Generator(device=device).manual_seed(args.seed)",
      "    generator = torch.Generator(device=device).manual_seed(0)"),
]


def check_snippets(source: str, mutants) -> list:
    """The problems with the list against `source`: snippets not found exactly once, replacements
    that change nothing or do not compile, duplicate names."""
    problems, names = [], set()
    for m in mutants:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        count = source.count(m.snippet)
        if count != 1:
            problems.append(f"{m.name}: snippet found {count} times (want exactly 1): "
                            f"{m.snippet.strip()[:70]!r}")
            continue
        if m.replacement == m.snippet:
            problems.append(f"{m.name}: the replacement equals the snippet")
            continue
        try:
            compile(source.replace(m.snippet, m.replacement), TARGET, "exec")
        except SyntaxError as e:
            problems.append(f"{m.name}: the mutated file does not compile: {e}")
    return problems


def make_base(tmp: Path, tests) -> Path:
    """The repo at HEAD (git archive) with the working tree's mamba2.py and test files on top."""
    base = tmp / "base"
    base.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    for name in {TARGET, *(t.split("::")[0] for t in tests),
                 *(p.name for p in REPO.glob("test_*.py")), "conftest.py"}:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, base / name)
    for name in tests:                         # files, or pytest node ids (file::test)
        if not (base / name.split("::")[0]).is_file():
            raise SystemExit(f"mutants.py: no test file {name.split('::')[0]} in {REPO}")
    return base


def run_pytest(workdir: Path, tests, k, timeout: float):
    """(status, first failing test, seconds, output tail) of the suite in workdir."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if k:
        cmd += ["-k", k]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(workdir),
               PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # pytest and whatever it started
        out, _ = proc.communicate()
        return "timeout", "", time.monotonic() - start, out[-3000:]
    seconds = time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    first = failed[0] if failed else ""
    if proc.returncode == 0:
        return "survived", "", seconds, out[-3000:]
    if proc.returncode == 5:
        return "no tests", "", seconds, out[-3000:]
    if not first:
        first = f"(pytest exit status {proc.returncode})"
    return "killed", first, seconds, out[-3000:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS),
                    help="test files or node ids (file::test), in the order pytest runs them "
                         "(default: %(default)s)")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run this mutant only (repeatable; a trailing * matches a prefix)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per mutant (default "
                                                                "%(default)s)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the check that the unmutated suite passes")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pytest's output tail for "
                                                                 "survivors and timeouts")
    args = ap.parse_args(argv)

    source = (REPO / TARGET).read_text(encoding="utf-8")
    problems = check_snippets(source, MUTANTS)
    if problems:
        print("mutants.py: the mutant list does not match the current mamba2.py:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 2
    selected = MUTANTS
    if args.only:
        def wanted(name):
            return any(name == o or (o.endswith("*") and name.startswith(o[:-1]))
                       for o in args.only)
        selected = [m for m in MUTANTS if wanted(m.name)]
        unknown = [o for o in args.only if not any(
            m.name == o or (o.endswith("*") and m.name.startswith(o[:-1])) for m in MUTANTS)]
        if unknown:
            print(f"mutants.py: unknown mutants {unknown}", file=sys.stderr)
            return 2
    if args.list:
        for m in selected:
            print(m.name)
        print(f"{len(selected)} mutants, every snippet found exactly once in {TARGET}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="mamba2-mutants-"))
    try:
        base = make_base(tmp, args.tests)
        print(f"copy of the repo in {base}; tests: {' '.join(args.tests)}"
              + (f" -k {args.k!r}" if args.k else ""), flush=True)
        if not args.no_baseline:
            status, first, seconds, tail = run_pytest(base, args.tests, args.k, args.timeout)
            print(f"baseline (no mutant): {status} in {seconds:.0f} s", flush=True)
            if status != "survived":
                print(tail, file=sys.stderr)
                print("mutants.py: the unmutated suite must pass first", file=sys.stderr)
                return 2
        results = []
        for i, m in enumerate(selected, 1):
            work = tmp / f"m{i:03d}"
            shutil.copytree(base, work, symlinks=True)
            target = work / TARGET
            target.write_text(source.replace(m.snippet, m.replacement), encoding="utf-8")
            status, first, seconds, tail = run_pytest(work, args.tests, args.k, args.timeout)
            results.append((m.name, status, first, seconds))
            print(f"[{i}/{len(selected)}] {m.name}: {status} {first} ({seconds:.0f} s)",
                  flush=True)
            if args.verbose and status in ("survived", "timeout", "no tests"):
                print(tail)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(r[0]) for r in results) if results else 10
    print()
    print(f"{'mutant':{width}}  {'status':8}  {'s':>5}  first failing test")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 5}  {'-' * 40}")
    for name, status, first, seconds in results:
        print(f"{name:{width}}  {status:8}  {seconds:5.0f}  {first}")
    bad = [r for r in results if r[1] != "killed"]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants killed"
          + (f"; not killed: {', '.join(r[0] for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
