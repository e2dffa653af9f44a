"""train.py under torchrun: DDP, FSDP2 and context parallelism equal one process.

Every multi-rank run is a real ``python -m torch.distributed.run --standalone`` job of gloo
CPU processes on a tiny float64 model; the reference is the one-process ``train.main`` on the
same data and the same global batches. Tolerance 1e-6 everywhere (float64: the measured
differences are ~1e-15, reductions in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from mamba2 import Mamba2Config, Mamba2LMHeadModel

REPO = Path(__file__).resolve().parent
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
