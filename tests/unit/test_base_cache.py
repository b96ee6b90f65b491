"""Publishing the converted base model's cache when several processes convert it at once, and removing what a
killed conversion left (service.model.base_model)."""
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from service.model.base_model import (
    PARTIAL_LOCK,
    _abandoned,
    converting,
    load_base,
    publish,
    remove_abandoned_partials,
)
from service.runtime import EXPECTED_START_FAILURES
from service.settings import Settings


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


def test_a_partial_folder_of_a_killed_conversion_is_removed(tmp_path):
    """A process killed while converting left its partial folder (about 540 MB) for good; now the next start
    removes it, as its lock died with the process."""
    partial = tmp_path / "base.partial-99-ab"
    code = ("import sys, time; from pathlib import Path; from service.model.base_model import converting\n"
            "with converting(Path(sys.argv[1])):\n"
            "    (Path(sys.argv[1]) / 'model.safetensors').write_text('half')\n"
            "    print('writing', flush=True); time.sleep(60)")
    converter = subprocess.Popen([sys.executable, "-c", code, str(partial)], stdout=subprocess.PIPE, text=True,
                                 cwd=Path(__file__).parents[2])
    try:
        assert converter.stdout.readline() == "writing\n"
        remove_abandoned_partials(tmp_path / "base")
        assert (partial / "model.safetensors").exists(), "a running conversion's folder was removed"
    finally:
        converter.send_signal(signal.SIGKILL)
        converter.wait()
    assert (partial / PARTIAL_LOCK).exists()
    remove_abandoned_partials(tmp_path / "base")
    assert not partial.exists()


def test_a_conversion_running_here_keeps_its_folder_and_leaves_no_lock_file(tmp_path):
    partial = tmp_path / "base.partial-1-cd"
    with converting(partial):
        (partial / "config.json").write_text("mine")
        remove_abandoned_partials(tmp_path / "base")
        assert (partial / PARTIAL_LOCK).exists()
    assert sorted(path.name for path in partial.iterdir()) == ["config.json"]


def test_only_partial_folders_with_a_free_lock_are_removed(tmp_path):
    """A partial folder with no lock file is being made or published; the cache itself and other folders are not
    partial ones."""
    cache = folder(tmp_path / "base", "theirs")
    (cache / PARTIAL_LOCK).write_text("")
    lockless = folder(tmp_path / "base.partial-2-ef", "mine")
    other = folder(tmp_path / "other.partial-3-ab", "other")
    (other / PARTIAL_LOCK).write_text("")
    abandoned = folder(tmp_path / "base.partial-4-ab", "left")
    (abandoned / PARTIAL_LOCK).write_text("")
    remove_abandoned_partials(cache)
    assert cache.exists() and lockless.exists() and other.exists() and not abandoned.exists()


def test_a_lock_taken_after_its_converter_let_go_to_publish_is_no_sign_of_death(tmp_path):
    """A remover that opened the lock file just before the converter removed it, and took the lock just after the
    converter let go (to publish the folder), had removed the finished folder, failing that start or emptying the
    cache mid-publish (review)."""
    partial = tmp_path / "base.partial-5-ab"
    with contextlib.ExitStack() as remover:
        with converting(partial):
            (partial / "config.json").write_text("mine")
            opened = remover.enter_context(open(partial / PARTIAL_LOCK))  # before the converter's last step
        with pytest.raises(FileNotFoundError):
            _abandoned(partial / PARTIAL_LOCK, opened)
    assert publish(partial, tmp_path / "base").joinpath("config.json").read_text() == "mine"


def test_a_link_named_as_a_partial_folder_is_left_alone(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="service.model.base_model")
    target = folder(tmp_path / "elsewhere", "kept")
    (target / PARTIAL_LOCK).write_text("")
    (tmp_path / "base.partial-6-ab").symlink_to(target)
    remove_abandoned_partials(tmp_path / "base")
    assert (target / "config.json").exists() and "removing" not in caplog.text


def cut(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


CORRUPTIONS = {
    "cut mid-data": lambda model: cut(model, model.stat().st_size // 2),  # safetensors: file not fully covered
    "cut mid-header": lambda model: cut(model, 20),  # its header length lies past the end
    "a garbled header": lambda model: model.write_bytes(b"\x10" + b"\0" * 7 + b"{not json}      " + b"\0" * 64),
    "a garbled config": lambda model: (model.parent / "config.json").write_text("{"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_converted_cache_is_an_error_naming_the_folder_and_the_way_out(corruption, tiny_llama_dir,
                                                                                tmp_path):
    """A converted cache that cannot be read (a disk that filled, a file cut or edited) fails the start with one
    ValueError (an expected start failure: one log line) naming the folder and saying to delete it, not a
    SafetensorError's traceback that names neither."""
    cached = tmp_path / "smollm2-135m-instruct"
    shutil.copytree(tiny_llama_dir, cached)
    CORRUPTIONS[corruption](cached / "model.safetensors")
    with pytest.raises(ValueError, match="delete that folder") as failed:
        load_base(Settings(base_model="smollm2", cache_dir=tmp_path, device="cpu"))
    assert str(cached) in str(failed.value) and isinstance(failed.value, EXPECTED_START_FAILURES)


def test_a_model_folder_of_ones_own_that_cannot_be_read_keeps_its_own_error(tiny_llama_dir, tmp_path):
    """Nothing to delete there: the folder is the user's, not a cache."""
    mine = shutil.copytree(tiny_llama_dir, tmp_path / "mine")
    cut(mine / "model.safetensors", 1000)
    with pytest.raises(SafetensorError):
        load_base(Settings(base_model=str(mine), device="cpu"))
