"""Atomic, self-describing checkpoints (cascade.checkpoint)."""

import json

import pytest
import torch

from cascade import checkpoint as ck


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def _save(run_dir, step, keep_last=3):
    return ck.save_checkpoint(
        run_dir,
        step,
        weights={"model": _weights(step), "ema": _weights(step + 1)},
        training_state={"step": step, "rng": torch.arange(step, dtype=torch.uint8), "counters": {"nan": 0}},
        config={"stage": {"name": "toy"}, "train": {"lr": 1e-4}},
        keep_last=keep_last,
    )


def test_round_trip_and_latest(tmp_path):
    path = _save(tmp_path, 10)
    assert path.name == "step-00000010"
    assert ck.latest_checkpoint(tmp_path) == path
    record = ck.load_config(tmp_path)
    assert record["step"] == 10 and record["stage"] == {"name": "toy"} and record["train"]["lr"] == 1e-4
    for which, seed in (("model", 10), ("ema", 11)):
        loaded = ck.load_weights(tmp_path, which)
        for k, v in _weights(seed).items():
            assert torch.equal(loaded[k], v)
    state = ck.load_training_state(path)
    assert state["step"] == 10 and state["counters"] == {"nan": 0}
    assert torch.equal(state["rng"], torch.arange(10, dtype=torch.uint8))


def test_keep_last_and_resolve(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000004", "step-00000005"]
    assert ck.resolve_checkpoint(tmp_path).name == "step-00000005"
    assert ck.resolve_checkpoint(tmp_path / "checkpoints").name == "step-00000005"
    assert ck.resolve_checkpoint(tmp_path / "checkpoints" / "step-00000004").name == "step-00000004"


def test_half_written_checkpoint_is_ignored(tmp_path):
    good = _save(tmp_path, 7)
    # a run killed mid-write leaves a temporary folder and possibly a step folder without config.json
    (tmp_path / "checkpoints" / ".step-00000008.tmp-999").mkdir()
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    assert ck.latest_checkpoint(tmp_path) == good
    _save(tmp_path, 8)
    assert not (tmp_path / "checkpoints" / ".step-00000008.tmp-999").exists()


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 3)
    path = ck.save_checkpoint(
        tmp_path, 3, weights={"ema": {"w": torch.ones(2)}}, training_state={}, config={"stage": {"name": "x"}}
    )
    assert json.loads((path / "config.json").read_text())["stage"] == {"name": "x"}
    assert not (path / "model.safetensors").exists()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ck.resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="stage"):
        ck.save_checkpoint(tmp_path, 1, weights={}, training_state={}, config={})
    with pytest.raises(ValueError, match="unknown weight sets"):
        ck.save_checkpoint(tmp_path, 1, weights={"opt": {}}, training_state={}, config={"stage": {}})
    path = _save(tmp_path, 1)
    with pytest.raises(ValueError, match="which must be"):
        ck.load_weights(path, "best")
    record = json.loads((path / "config.json").read_text())
    record["format_version"] = 99
    (path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="format 99"):
        ck.load_config(path)


def test_training_state_refuses_pickled_code(tmp_path):
    path = _save(tmp_path, 2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "training_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.load_training_state(path)


def test_pickled_code_is_refused_in_one_line_that_never_advises_disabling_the_check(tmp_path):
    path = _save(tmp_path, 2)
    torch.save({"x": print}, path / "training_state.pt")  # a function: pickled code
    with pytest.raises(ck.CheckpointError) as exc:
        ck.load_training_state(path)
    message = str(exc.value)
    assert message.startswith("checkpoint file ") and "training_state.pt holds pickled code (the global " in message
    assert "print) and is refused: loading it could run arbitrary code" in message and message.endswith("or retrain")
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message


def test_load_weights_accepts_any_torch_device_spelling(tmp_path):
    """accelerate's device under torchrun prints as "cpu:0", which safetensors refuses: every spelling loads."""
    path = _save(tmp_path, 4)
    for device in (torch.device("cpu", 0), torch.device("cpu"), "cpu", "cpu:0"):
        loaded = ck.load_weights(path, "ema", device=device)
        assert torch.equal(loaded["w"], _weights(5)["w"])


@pytest.mark.parametrize("victim, damage", [
    ("ema.safetensors", "truncate"), ("model.safetensors", "garbage"), ("training_state.pt", "truncate"),
    ("config.json", "truncate"),
])
def test_damaged_files_raise_one_line_naming_the_file(tmp_path, victim, damage):
    path = _save(tmp_path, 6)
    file = path / victim
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 8)
    with pytest.raises(ck.CheckpointError) as err:
        ck.verify_checkpoint(path)
    assert str(file) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_candidates_put_latest_first_then_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    assert [p.name for p in ck.checkpoint_candidates(tmp_path)] == ["step-00000002", "step-00000003",
                                                                    "step-00000001"]
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe")  # a damaged pointer: the listing decides
    assert ck.latest_checkpoint(tmp_path).name == "step-00000003"
