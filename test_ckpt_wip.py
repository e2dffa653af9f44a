"""Checkpoint defects: exact low-precision round trips, a save that is atomic across its files
(a journal completed by the next load or save), no removal of files that are not weights, and
named errors for directories that cannot be made. Tiny models; the whole file runs in seconds."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import mamba2
from mamba2 import Mamba2Config, Mamba2LMHeadModel

FORMATS = ["mamba_ssm", "transformers", "full"]
IDS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and leaves the other core to whoever shares it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed, dtype=None, **kw):
    cfg = dict(d_model=16, d_state=8, headdim=4, chunk_size=4, n_layer=2, vocab_size=40)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config(**cfg), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
            # D: fp32 values (in a bf16 / fp16 model too) that a bf16 / fp16 rounding changes
            p.copy_(1 + noise + 1e-4 if name.endswith(".D") else p.double() + noise)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k


# ========================================================================= 1. exact round trips

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision_model_round_trip_is_bit_exact(tmp_path, dtype, fmt):
    """D stays fp32 in a bf16/fp16 model (as official); it must come back as saved, not rounded
    through the checkpoint's majority dtype — with dtype=None and with the explicit dtype."""
    model = _model(1, dtype=dtype)
    D = model.backbone.layers[0].mixer.D
    assert D.dtype == torch.float32 and not torch.equal(D, D.to(dtype).float())
    model.save_pretrained(tmp_path, format=fmt)
    for kw in ({}, {"dtype": dtype}, {"dtype": str(dtype).removeprefix("torch.")}):
        back = Mamba2LMHeadModel.from_pretrained(tmp_path, **kw)
        _assert_same_state(model, back)
        assert torch.equal(_logits(back), _logits(model))


def _mixed_file(tmp_path):
    """An fp32 checkpoint rewritten as fp16 weights with fp32 D and A_log (as mamba2-2.7b)."""
    from safetensors.torch import load_file, save_file
    _model(2).save_pretrained(tmp_path, format="full")
    state = load_file(str(tmp_path / "model.safetensors"))
    mixed = {k: v if k.endswith((".D", ".A_log")) else v.half() for k, v in state.items()}
    save_file(mixed, str(tmp_path / "model.safetensors"))
    return mixed


def test_mixed_dtype_file_loads_fp32_D_exactly(tmp_path):
    mixed = _mixed_file(tmp_path)
    for dtype in (None, torch.float16, torch.bfloat16, torch.float32):
        back = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=dtype)
        want_dtype = dtype or torch.float16
        for k, v in back.state_dict().items():
            stored = mixed[k if k != "lm_head.weight" else "backbone.embedding.weight"]
            if k.endswith(".D"):           # fp32 in every model here: the stored value exactly
                assert v.dtype == torch.float32 and torch.equal(v, stored), (dtype, k)
            else:                          # one conversion from the stored dtype
                assert v.dtype == want_dtype and torch.equal(v, stored.to(want_dtype)), (dtype, k)


def test_explicit_low_dtype_of_fp32_checkpoint_keeps_D_exact(tmp_path):
    model = _model(3)
    model.save_pretrained(tmp_path, format="full")
    back = Mamba2LMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in back.state_dict().items():
        want = model.state_dict()[k]
        if k.endswith(".D"):
            assert v.dtype == torch.float32 and torch.equal(v, want), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, want.bfloat16()), k
    loaded = mamba2.load_checkpoint_tensors(tmp_path)      # one dtype for all, as documented
    assert loaded["backbone.embedding.weight"].dtype == torch.float32


# ====================================================================== 2. atomic across files

OLD_KW, NEW_KW = {}, {"dt_limit": (0.0, 3.0)}     # configs that differ but fit either weights
SCENARIOS = {   # old save, new save
    "sharded_to_single": (dict(format="transformers", max_shard_size=4000),
                          dict(format="transformers")),
    "single_to_sharded": (dict(format="full"), dict(format="transformers", max_shard_size=4000)),
    "mamba_ssm_to_transformers": (dict(format="mamba_ssm"),
                                  dict(format="transformers", max_shard_size=4000)),
    "transformers_to_mamba_ssm": (dict(format="transformers", max_shard_size=4000),
                                  dict(format="mamba_ssm")),
}


def _snapshot(d):
    model = Mamba2LMHeadModel.from_pretrained(d)
    return model.config, model.state_dict(), _logits(model), sorted(p.name for p in d.iterdir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """For each scenario: a directory holding the old checkpoint, and (config, state, logits,
    file names) of the old and of the new checkpoint, each saved cleanly."""
    old, new = _model(4, **OLD_KW), _model(5, **NEW_KW)
    out = {}
    for name, (old_kw, new_kw) in SCENARIOS.items():
        base = tmp_path_factory.mktemp(name)
        old.save_pretrained(base / "old", **old_kw)
        want_old = _snapshot(base / "old")
        shutil.copytree(base / "old", base / "new")
        new.save_pretrained(base / "new", **new_kw)
        out[name] = (base / "old", new, new_kw, want_old, _snapshot(base / "new"))
    assert len(out["sharded_to_single"][3][3]) > 3, "the old checkpoint should be sharded"
    return out


class _Failure:
    """Replaces `owner.attr` (os.replace, os.unlink, Path.unlink) so that its n-th call raises
    `error`, before doing its work or (after=True) after it, like a Ctrl-C just too late."""

    def __init__(self, monkeypatch, owner, attr, n, error, after):
        real, self.calls, self.fired = getattr(owner, attr), 0, False

        def failing(*a, **k):
            self.calls += 1
            if self.calls != n:
                return real(*a, **k)
            self.fired = True
            if after:
                real(*a, **k)
            raise error("injected failure")
        monkeypatch.setattr(owner, attr, failing)


def _matches(got, want) -> bool:
    config, state, logits, files = got
    w_config, w_state, w_logits, w_files = want
    return config == w_config and files == w_files and torch.equal(logits, w_logits) and \
        state.keys() == w_state.keys() and all(torch.equal(state[k], w_state[k]) for k in state)


OPS = {"os.replace": (os, "replace"), "os.unlink": (os, "unlink")}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("error, after", [(OSError, False), (KeyboardInterrupt, False),
                                          (KeyboardInterrupt, True)])
def test_interrupted_save_reads_old_or_new_never_a_mix(tmp_path, monkeypatch, saved, scenario,
                                                       op, error, after):
    """Fail the n-th call of `op` in save_pretrained, for n = 1, 2, ... until the save goes
    through: every time, the next from_pretrained reads exactly the old checkpoint or exactly
    the new one (config, every tensor, logits, and the files left in the directory)."""
    old_dir, new, new_kw, want_old, want_new = saved[scenario]
    outcomes = []
    for n in range(1, 100):
        d = tmp_path / f"n{n}"
        shutil.copytree(old_dir, d)
        failure = _Failure(monkeypatch, *OPS[op], n, error, after)
        try:
            new.save_pretrained(d, **new_kw)
        except (OSError, KeyboardInterrupt):
            assert failure.fired
        monkeypatch.undo()
        if not failure.fired:                                    # the save went through
            assert _matches(_snapshot(d), want_new)
            break
        journal = d / mamba2._JOURNAL
        if journal.exists():   # readers that know no journal: no stale index shadows new weights
            steps = json.loads(journal.read_text())["steps"]
            done = {s[2] for s in steps if s[0] == "replace" and not (d / s[1]).exists()}
            if done & {"model.safetensors", "pytorch_model.bin"}:
                assert not (d / "model.safetensors.index.json").exists() or \
                    "model.safetensors.index.json" in done
        got = _snapshot(d)
        assert _matches(got, want_old) or _matches(got, want_new), n
        outcomes.append("old" if _matches(got, want_old) else "new")
    else:
        raise AssertionError("the save never went through")
    assert outcomes, "no failure was injected"
    if op == "os.replace" and not after:
        assert outcomes[0] == "old" and outcomes[-1] == "new"   # before and after the commit


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failing_cleanup_after_a_failed_commit_keeps_the_old_checkpoint(tmp_path, monkeypatch,
                                                                        saved, error):
    """The commit (the journal's rename) fails, then so does the n-th removal of a temporary
    file (Path.unlink): the old checkpoint stays what is read, whatever is left behind."""
    old_dir, new, new_kw, want_old, _ = saved["single_to_sharded"]
    for n in range(1, 100):
        d = tmp_path / f"n{n}"
        shutil.copytree(old_dir, d)
        _Failure(monkeypatch, os, "replace", 1, OSError, False)
        cleanup = _Failure(monkeypatch, Path, "unlink", n, error, False)
        with pytest.raises((OSError, KeyboardInterrupt)):
            new.save_pretrained(d, **new_kw)
        monkeypatch.undo()
        config, state, logits, _ = _snapshot(d)
        assert _matches((config, state, logits, want_old[3]), want_old), n
        assert not (d / mamba2._JOURNAL).exists()
        if not cleanup.fired:
            assert sorted(p.name for p in d.iterdir()) == want_old[3]
            break
    assert n > 3


def test_interrupted_save_is_completed_by_the_next_save(tmp_path, monkeypatch, saved):
    old_dir, new, new_kw, _, _ = saved["sharded_to_single"]
    d = tmp_path / "ckpt"
    shutil.copytree(old_dir, d)
    _Failure(monkeypatch, os, "replace", 3, KeyboardInterrupt, False)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(d, **new_kw)
    monkeypatch.undo()
    assert (d / mamba2._JOURNAL).exists()
    third = _model(6)
    third.save_pretrained(d, format="full")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    back = Mamba2LMHeadModel.from_pretrained(d)
    _assert_same_state(third, back)


def test_interrupted_save_in_a_read_only_directory_is_a_clear_error(tmp_path, monkeypatch,
                                                                    saved):
    old_dir, new, new_kw, _, want_new = saved["single_to_sharded"]
    d = tmp_path / "ckpt"
    shutil.copytree(old_dir, d)
    _Failure(monkeypatch, os, "replace", 2, OSError, False)     # the first rename after commit
    with pytest.raises(OSError):
        new.save_pretrained(d, **new_kw)
    monkeypatch.undo()

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(ValueError, match="interrupted save_pretrained.*must be completed"):
        Mamba2LMHeadModel.from_pretrained(d)
    with pytest.raises(ValueError, match="interrupted save_pretrained"):
        mamba2.load_checkpoint_tensors(d)
    monkeypatch.undo()
    assert _matches(_snapshot(d), want_new)
    assert not (d / mamba2._JOURNAL).exists()


def test_done_journal_in_a_read_only_directory_loads(tmp_path, monkeypatch):
    """Every step done, only the journal left (its removal failed): loading needs no writes."""
    model = _model(7)
    _Failure(monkeypatch, os, "unlink", 1, OSError, False)      # the journal's removal
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path, format="full")
    monkeypatch.undo()
    assert (tmp_path / mamba2._JOURNAL).exists()

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "unlink", read_only)
    _assert_same_state(model, Mamba2LMHeadModel.from_pretrained(tmp_path))


@pytest.mark.parametrize("steps", [
    [["remove", "notes.txt"]], [["replace", ".x.1.tmp", "notes.txt"]],
    [["replace", ".model.safetensors.1.tmp", "../model.safetensors"]],
    [["remove", "../model.safetensors"]], [["remove", "/etc/passwd"]], "nonsense"])
def test_a_forged_journal_is_refused_and_touches_nothing(tmp_path, steps):
    _model(8).save_pretrained(tmp_path / "ckpt", format="full")
    d = tmp_path / "ckpt"
    (d / "notes.txt").write_text("mine")
    (d / ".x.1.tmp").write_text("x")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    (d / mamba2._JOURNAL).write_text(json.dumps({"steps": steps}))
    with pytest.raises(ValueError, match="not a valid save_pretrained journal"):
        Mamba2LMHeadModel.from_pretrained(d)
    with pytest.raises(ValueError, match="not a valid save_pretrained journal"):
        _model(9).save_pretrained(d, format="full")
    (d / mamba2._JOURNAL).unlink()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_journal_is_never_fetched_from_the_hub():
    import fnmatch
    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]   # resolve_checkpoint's
    assert not any(fnmatch.fnmatch(mamba2._JOURNAL, p) for p in patterns)


# ============================================================== 3. only weight files are removed

def test_save_removes_only_weight_files_an_index_names(tmp_path):
    d = tmp_path / "ckpt"
    _model(10).save_pretrained(d, format="transformers", max_shard_size=4000)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    outside = tmp_path / "model-00001-of-00009.safetensors"
    outside.write_bytes(b"outside")
    (d / "sub").mkdir()
    mine = {"notes.txt": b"precious", "tokenizer.json": b"{}", "model-v1.safetensors": b"v1",
            "model-00007-of-00009.safetensors": b"a shard no index names",
            "sub/model-00002-of-00009.safetensors": b"in a subfolder"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    names = ["notes.txt", "tokenizer.json", "model-v1.safetensors", str(outside),
             "../model-00001-of-00009.safetensors", "sub/model-00002-of-00009.safetensors",
             "./notes.txt", "sub/../notes.txt", 7, None]
    for i, name in enumerate(names):
        index["weight_map"][f"x{i}"] = name
    index_file.write_text(json.dumps(index))
    model = _model(11)
    model.save_pretrained(d, format="full")
    for name, data in mine.items():
        assert (d / name).read_bytes() == data, name
    assert outside.read_bytes() == b"outside"
    assert not any((d / s).exists() for s in shards)          # the real shards did go
    assert not index_file.exists()
    left = {p.name for p in d.iterdir()} - {Path(n).parts[0] for n in mine}
    assert left == {"config.json", "model.safetensors"}
    _assert_same_state(model, Mamba2LMHeadModel.from_pretrained(d))


def test_weight_file_names():
    ok = ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
          "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors",
          "pytorch_model-00003-of-00010.bin", "model-100000-of-100000.safetensors"]
    bad = ["notes.txt", "tokenizer.json", "config.json", "model-1-of-2.safetensors",
           "model-00001-of-00002.bin", "../model.safetensors", "sub/model.safetensors",
           "/model.safetensors", "model-00001-of-00002.safetensors/x", ".model.safetensors",
           "model.safetensors\n", 3, None]
    assert all(mamba2._is_weight_file_name(n) for n in ok)
    assert not any(mamba2._is_weight_file_name(n) for n in bad)


# ================================================================= 4. directories that cannot be

def test_save_under_a_file_is_a_value_error_naming_the_directory(tmp_path):
    f = tmp_path / "some_file"
    f.write_text("x")
    for target in (f / "sub", f / "sub" / "deeper", f):
        with pytest.raises(ValueError, match="directory '.*some_file.*'") as e:
            _model(12).save_pretrained(target)
        assert "not a directory" in str(e.value) or "is a file" in str(e.value)
    assert f.read_text() == "x" and sorted(tmp_path.iterdir()) == [f]
