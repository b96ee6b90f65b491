"""Publishing the converted base model's cache when several processes convert it at once (service.model.base_model)."""
import pytest

from service.model.base_model import publish


def folder(path, text):
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


def test_a_finished_conversion_is_moved_into_place(tmp_path):
    partial = folder(tmp_path / "base.partial-1-ab", "mine")
    assert publish(partial, tmp_path / "base") == tmp_path / "base"
    assert (tmp_path / "base" / "config.json").read_text() == "mine" and not partial.exists()


def test_a_cache_another_process_published_first_is_kept(tmp_path):
    """Two servers started at once on a fresh cache both convert; the second's rename fails on the first's folder,
    which it uses (the old code raised 'Directory not empty' and failed the second start)."""
    theirs = folder(tmp_path / "base", "theirs")
    partial = folder(tmp_path / "base.partial-2-cd", "mine")
    assert publish(partial, theirs) == theirs
    assert (theirs / "config.json").read_text() == "theirs"


def test_a_failed_move_with_no_cache_in_place_is_raised(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stray").write_text("not a model")
    with pytest.raises(OSError):
        publish(folder(tmp_path / "base.partial-3-ef", "mine"), tmp_path / "base")
