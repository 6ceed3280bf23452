"""Checkpoint bookkeeping, durable writes and schedules (the training-level resume test is in integration/)."""

import pytest

from rlhf.runtime.checkpoint import ResumeError, _prune, check_same_config, latest_checkpoint
from rlhf.runtime.files import atomic_write_text
from rlhf.runtime.schedule import lr_lambda


def _fake_checkpoint(root, step):
    d = root / "checkpoints" / f"step-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")
    return d


def test_latest_follows_pointer_and_survives_a_stale_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path, 5)
    ten = _fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / ".tmp-step-15").mkdir()  # a save killed before its rename
    assert latest_checkpoint(tmp_path) == ten  # no pointer: newest complete folder
    atomic_write_text(tmp_path / "checkpoints" / "latest", "step-5\n")
    assert latest_checkpoint(tmp_path).name == "step-5"
    atomic_write_text(tmp_path / "checkpoints" / "latest", "step-99\n")  # points at a deleted folder
    assert latest_checkpoint(tmp_path) == ten


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3):
        _fake_checkpoint(tmp_path, s)
    _prune(tmp_path / "checkpoints", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_config_mismatch_is_named():
    check_same_config({"lr": 1.0}, {"lr": 1.0}, checkpoint="x")
    with pytest.raises(ResumeError, match=r"lr: checkpoint has 1.0, this run has 2.0"):
        check_same_config({"lr": 1.0, "seed": 0}, {"lr": 2.0, "seed": 0}, checkpoint="x")


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_schedule_warmup_then_decay():
    assert [lr_lambda(s, 2, 10, "linear") for s in (0, 1)] == [0.5, 1.0]
    assert lr_lambda(2, 2, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 2, 10, "cosine") == pytest.approx(0.0)
    assert lr_lambda(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_lambda(9, 2, 10, "constant") == 1.0


def test_native_bf16_is_read_from_the_cpu_flags():
    from rlhf.runtime.distributed import native_bf16_in

    avx2_epyc = "processor\t: 0\nflags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 vaes\n"
    sapphire = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    graviton3 = "Features\t: fp asimd sve bf16 i8mm\n"
    assert native_bf16_in(avx2_epyc) is None
    assert native_bf16_in(sapphire) == "amx_bf16"
    assert native_bf16_in(graviton3) == "bf16"
    assert native_bf16_in("model name\t: bf16 in a name is not a flag\n") is None


@pytest.mark.parametrize("pays", [True, False])
def test_auto_precision_picks_bf16_only_where_it_pays(monkeypatch, pays):
    from rlhf.runtime import distributed

    monkeypatch.setattr(distributed, "bf16_pays", lambda: (pays, "because"))
    chosen, note = distributed.resolve_mixed_precision("auto")
    assert chosen == ("bf16" if pays else "no") and "because" in note
    assert distributed.resolve_mixed_precision("no") == ("no", None)
    chosen, note = distributed.resolve_mixed_precision("bf16")
    assert chosen == "bf16" and (note is None) == pays  # honoured, with a warning where it is slow
