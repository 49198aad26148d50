"""expand_sources: files, folders, globs, .txt/.csv lists, order and duplicates."""

from __future__ import annotations

import os

import pytest

from hierax.data.sources import expand_sources, find_image_rows, find_images, read_path_list
from hierax.errors import HieraxError
from tests.data_fixtures import write_image


@pytest.fixture()
def tree(tmp_path):
    for i, rel in enumerate(["b/2.jpg", "b/1.PNG", "a/x.webp", "a/deep/er/y.tif", "c.gif"]):
        write_image(tmp_path / rel, seed=i)
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_recursive_sorted_images_only(tree):
    got = expand_sources([tree / "a", tree / "b"])
    assert got == [str(tree / "a/deep/er/y.tif"), str(tree / "a/x.webp"), str(tree / "b/1.PNG"), str(tree / "b/2.jpg")]


def test_folder_not_recursive(tree):
    assert expand_sources(tree / "a", recursive=False) == [str(tree / "a/x.webp")]


def test_files_keep_order_and_dedupe(tree):
    c, b2 = str(tree / "c.gif"), str(tree / "b/2.jpg")
    assert expand_sources([c, b2, c, tree / "b"]) == [c, b2, str(tree / "b/1.PNG")]


def test_glob(tree):
    got = expand_sources([str(tree / "**" / "*.jpg"), str(tree / "a" / "*.webp")])
    assert got == [str(tree / "b/2.jpg"), str(tree / "a/x.webp")]


def test_txt_list_relative_to_list_and_missing_kept(tree, monkeypatch):
    lst = tree / "lists" / "files.txt"
    lst.parent.mkdir()
    (tree / "lists" / "here.jpg").write_bytes(b"")
    lst.write_text(f"# comment\nhere.jpg\n\n{tree / 'c.gif'}\nmissing.jpg\n")
    monkeypatch.chdir(tree)
    assert expand_sources([lst]) == [str(tree / "lists" / "here.jpg"), str(tree / "c.gif"), "missing.jpg"]


def test_csv_list_path_column_and_headerless(tree):
    with_header = tree / "with.csv"
    with_header.write_text("label,path\ncrow,b/2.jpg\nraven,c.gif\n")
    assert read_path_list(with_header) == [str(tree / "b/2.jpg"), str(tree / "c.gif")]
    plain = tree / "plain.csv"
    plain.write_text(f"{tree / 'c.gif'},crow\n")
    assert expand_sources(plain) == [str(tree / "c.gif")]


def test_missing_source_raises(tree):
    with pytest.raises(HieraxError, match="no such file"):
        expand_sources([tree / "nope"])


def test_glob_without_matches_is_empty(tree):
    assert expand_sources([os.path.join(tree, "*.zzz")]) == []


def test_one_file_by_two_spellings_is_listed_once(tree, monkeypatch):
    monkeypatch.chdir(tree)
    got = expand_sources(["b/2.jpg", "./b/../b/2.jpg", str(tree / "b" / "2.jpg"), "b", "b/*.jpg", "./b/"])
    assert got == ["b/2.jpg", "b/1.PNG"]


def test_no_images_names_the_sources(tree, caplog):
    (tree / "empty").mkdir()
    with pytest.raises(HieraxError) as raised:
        find_images([tree / "empty", str(tree / "a" / "*.zzz")])
    assert str(raised.value).startswith(f"no images found in {tree / 'empty'}, {tree / 'a' / '*.zzz'} (")
    assert f"folder {tree / 'empty'} holds no image files" in caplog.text
    assert find_images(tree / "b") == [str(tree / "b/1.PNG"), str(tree / "b/2.jpg")]


def test_csv_rows_keep_their_columns_per_path(tree):
    listing = tree / "places.csv"
    listing.write_text(
        "path,latitude,longitude,date,site\n"
        "b/2.jpg,48.85,2.35,2021-05-10,A\n"
        f"{tree / 'c.gif'},,,,B\n"
        "b/2.jpg,1,2,2020-01-01,again\n"
    )
    paths, rows = find_image_rows([listing, tree / "b"])
    assert paths == [str(tree / "b/2.jpg"), str(tree / "c.gif"), str(tree / "b/1.PNG")]
    assert rows[0] == {"latitude": "48.85", "longitude": "2.35", "date": "2021-05-10", "site": "A"}  # first row
    assert rows[1]["site"] == "B" and rows[1]["latitude"] == "" and rows[2] == {}
    # a header naming a place column but no `path` column: the path is the first column
    no_path = tree / "no_path.csv"
    no_path.write_text(f"image,Latitude,Longitude\n{tree / 'c.gif'},-33.9,151.2\n")
    assert find_image_rows(no_path) == ([str(tree / "c.gif")], [{"Latitude": "-33.9", "Longitude": "151.2"}])
    listed = tree / "list.txt"
    listed.write_text("c.gif\n")
    assert find_image_rows(listed) == ([str(tree / "c.gif")], [{}])
