"""The data folder: layout, generated names, atomic writes and refusal of escaping paths."""

from __future__ import annotations

import os

import pytest

from storage.files import CATEGORIES, FileStore, UnsafePathError, atomic_file, atomic_write


@pytest.fixture
def files(tmp_path):
    return FileStore(tmp_path / "data")


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_files_are_written_under_the_users_category_folder_with_generated_names(files):
    first = files.write(42, "photos", b"abc", ".png")
    second = files.write(42, "photos", b"abc", ".png")
    assert first != second
    for relpath in (first, second):
        folder, name = relpath.rsplit("/", 1)
        assert folder == "users/42/photos"
        assert len(name) == len("0" * 32 + ".png") and name.endswith(".png")
    assert (files.root / first).read_bytes() == b"abc"
    assert files.read(first, 42) == b"abc" and files.read(first) == b"abc"
    assert _leftovers(files.root / "users/42/photos") == []


def test_every_category_has_its_folder_and_unknown_ones_are_refused(files):
    for category in CATEGORIES:
        assert files.write(1, category, b"x", ".bin").startswith(f"users/1/{category}/")
    with pytest.raises(ValueError):
        files.write(1, "../shared", b"x", ".bin")
    with pytest.raises(ValueError):
        files.write(1, "photos", b"x", "/../../x")
    with pytest.raises(ValueError):
        files.write(-1, "photos", b"x", ".png")


def test_streamed_writer_gives_the_path_and_the_whole_file(files):
    with files.writer(7, "models", ".safetensors") as (handle, relpath):
        for chunk in (b"a" * 1000, b"b" * 1000):
            handle.write(chunk)
        assert not (files.root / relpath).exists()  # nothing visible until the write completes
    assert files.read(relpath, 7) == b"a" * 1000 + b"b" * 1000


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "dir" / "file.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


def test_a_crash_mid_write_leaves_neither_a_partial_file_nor_a_temp_file(tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"half of it")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert _leftovers(tmp_path) == []

    atomic_write(target, b"complete")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete"
    assert _leftovers(tmp_path) == []


def test_a_crash_in_a_store_write_leaves_the_users_folder_clean(files):
    with pytest.raises(RuntimeError):
        with files.writer(5, "checkpoints", ".zip") as (handle, _):
            handle.write(b"x")
            raise RuntimeError("boom")
    assert list((files.user_dir(5) / "checkpoints").iterdir()) == []


@pytest.mark.parametrize(
    "relpath",
    [
        "../avatar.db",
        "users/1/../2/photos/a.png",
        "users/1/photos/../../2/photos/a.png",
        "users/1/photos/..",
        "users/1/photos/sub/a.png",
        "users/1/secrets/a.png",
        "users/x/photos/a.png",
        "shared/a.png",
        "/etc/passwd",
        "users/1/photos/..\\..\\a.png",
    ],
)
def test_paths_escaping_a_users_folder_are_refused(files, relpath):
    with pytest.raises(UnsafePathError):
        files.resolve(relpath)


def test_another_users_path_is_refused_when_the_owner_is_given(files):
    relpath = files.write(2, "photos", b"bob's", ".png")
    with pytest.raises(UnsafePathError):
        files.read(relpath, 1)
    with pytest.raises(UnsafePathError):
        files.delete(relpath, 1)
    assert files.read(relpath, 2) == b"bob's"


def test_a_link_leading_out_of_the_folder_is_refused(files, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    folder = files.user_dir(1) / "photos"
    folder.mkdir(parents=True)
    os.symlink(secret, folder / "link.png")
    with pytest.raises(UnsafePathError):
        files.read("users/1/photos/link.png", 1)


def test_delete_and_delete_user_files(files):
    keep = files.write(2, "photos", b"bob", ".png")
    gone = files.write(1, "photos", b"12345", ".png")
    files.write(1, "models", b"678", ".safetensors")
    assert files.delete(gone, 1) and not files.delete(gone, 1)
    files.write(1, "generations", b"9", ".png")
    assert files.user_usage(1) == (2, 4)
    assert files.delete_user_files(1) == (2, 4)
    assert not files.user_dir(1).exists()
    assert files.delete_user_files(1) == (0, 0)
    assert files.read(keep, 2) == b"bob"


def test_shared_area_is_outside_user_folders_and_cannot_be_escaped(files):
    path = files.write_shared(b"class image", "class_images", "abc123", "0001.png")
    assert path == files.root / "shared" / "class_images" / "abc123" / "0001.png"
    assert path.read_bytes() == b"class image"
    for parts in (("..", "avatar.db"), ("a", "..", "..", "users"), ("/etc/passwd",)):
        with pytest.raises(UnsafePathError):
            files.shared_path(*parts)
