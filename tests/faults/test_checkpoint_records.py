"""Which checkpoint folder a resume picks: the newest complete one, never a cut one."""

import hashlib
import json

import pytest

from dtm_ds.checkpoint import COMPLETE, STAGING, CheckpointError, _publish, damage, is_complete, latest_tag


def _tag(root, name, files: dict[str, bytes], record: dict | None = "auto"):
    folder = root / "checkpoints" / name
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    if record == "auto":
        record = {"step": 1, "files": {f: len(d) for f, d in files.items()}}
    if record is not None:
        (folder / COMPLETE).write_text(json.dumps(record))
    return folder


def test_newest_complete_checkpoint_wins_and_cut_ones_are_skipped_with_a_warning(tmp_path):
    _tag(tmp_path, "step00000004", {"model.pt": b"x" * 10})
    _tag(tmp_path, "step00000008", {"model.pt": b"y" * 10})
    assert latest_tag(tmp_path, "step") == "step00000008"
    truncated = _tag(tmp_path, "step00000012", {"model.pt": b"z" * 10})
    (truncated / "model.pt").write_bytes(b"z" * 5)  # a file shorter than recorded
    _tag(tmp_path, "step00000016", {"model.pt": b"w" * 10}, record=None)  # no record: the write was cut
    _tag(tmp_path, "step00000020", {"model.pt": b"v"}, record={"files": "garbage"})
    with pytest.warns(
        UserWarning, match=r"\['step00000020', 'step00000016', 'step00000012'\] .* falling back to step00000008"
    ):
        assert latest_tag(tmp_path, "step") == "step00000008"
    assert not is_complete(truncated)


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    assert latest_tag(tmp_path, "step") is None
    _tag(tmp_path, "step00000004", {"model.pt": b"x"}, record=None)
    with pytest.warns(UserWarning, match="no complete checkpoint"):
        assert latest_tag(tmp_path, "step") is None


def test_best_and_other_prefixes_are_not_resumed_from(tmp_path):
    _tag(tmp_path, "best", {"model.pt": b"x"})
    _tag(tmp_path, "epoch00000002", {"model.pt": b"x"})
    assert latest_tag(tmp_path, "step") is None and latest_tag(tmp_path, "epoch") == "epoch00000002"


def test_a_folder_without_a_record_is_never_resumed_even_when_latest_names_it(tmp_path):
    """A rewrite of the checkpoint that `latest` names, cut by a kill, must not be resumed from."""
    _tag(tmp_path, "step00000004", {"model.pt": b"x"})
    _tag(tmp_path, "step00000008", {"model.pt": b"x"}, record=None)
    (tmp_path / "checkpoints" / "latest").write_text("step00000008")
    with pytest.warns(UserWarning, match=r"\['step00000008'\] .* falling back to step00000004"):
        assert latest_tag(tmp_path, "step") == "step00000004"


def test_staging_folders_are_not_checkpoints(tmp_path):
    _tag(tmp_path, "step00000004", {"model.pt": b"x"})
    _tag(tmp_path, f"{STAGING}step00000008", {"model.pt": b"x"})  # complete files, not yet renamed
    assert latest_tag(tmp_path, "step") == "step00000004"


def test_publishing_over_an_existing_tag_keeps_one_complete_copy_at_every_moment(tmp_path):
    old = _tag(tmp_path, "best", {"model.pt": b"old"})
    staging = _tag(tmp_path, f"{STAGING}best", {"model.pt": b"new!"}, record=None)
    _publish(staging, old, 7)
    assert is_complete(old) and (old / "model.pt").read_bytes() == b"new!" and not staging.exists()
    record = json.loads((old / COMPLETE).read_text())
    sha = hashlib.sha256(b"new!").hexdigest()  # an independent digest of the bytes written
    assert record == {"step": 7, "files": {"model.pt": 4}, "sha256": {"model.pt": sha}}
    assert sorted(p.name for p in old.parent.iterdir()) == ["best"]  # the old copy is gone after the swap


def _published(root, name, data: bytes):
    staging = _tag(root, f"{STAGING}{name}", {"model.pt": data}, record=None)
    _publish(staging, root / "checkpoints" / name, int(name[-8:]))
    return root / "checkpoints" / name


def test_a_damaged_checkpoint_is_passed_over_on_resume_and_none_intact_is_refused(tmp_path):
    """Bytes changed inside a file (same size: the size check cannot see it) fail its SHA-256: a resume falls
    back to the previous intact checkpoint with a warning naming the file; when none is intact, an error
    rather than a restart from step 0; a record without checksums is not trusted either."""
    _published(tmp_path, "step00000004", b"four" * 100)
    newest = _published(tmp_path, "step00000008", b"eight" * 100)
    assert damage(newest) is None and latest_tag(tmp_path, "step", verify=True) == "step00000008"
    data = bytearray((newest / "model.pt").read_bytes())
    data[250] ^= 0x01  # one flipped bit inside the file
    (newest / "model.pt").write_bytes(bytes(data))
    assert is_complete(newest) and "model.pt does not match its recorded SHA-256" in damage(newest)
    assert latest_tag(tmp_path, "step") == "step00000008"  # the listing alone does not read the bytes
    with pytest.warns(UserWarning, match=r"step00000008 is damaged: model.pt does not match"):
        assert latest_tag(tmp_path, "step", verify=True) == "step00000004"
    (tmp_path / "checkpoints" / "step00000004" / "model.pt").write_bytes(b"FOUR" * 100)
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match=r"no intact checkpoint .*\(damaged: \['step00000008', 'step00000004'\]"),
    ):
        latest_tag(tmp_path, "step", verify=True)
    old = _tag(tmp_path / "old", "step00000004", {"model.pt": b"x"})  # sizes only: an older record
    assert "holds no checksum" in damage(old)
