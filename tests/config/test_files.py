"""The one atomic-write helper: a file (or directory) is replaced whole or left as it was."""

from __future__ import annotations

import pytest

from igrpo_megatron.config.files import atomic_write, replace_directory, write_figure, write_text


def test_write_text_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    assert write_text(path, "one") == path and path.read_text() == "one"
    write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_replace_directory(tmp_path):
    final, staged = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    final.mkdir()
    (final / "old").write_text("x")
    staged.mkdir()
    (staged / "new").write_text("y")
    replace_directory(staged, final)
    assert [p.name for p in final.iterdir()] == ["new"] and not staged.exists()


def test_write_figure_saves_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = write_figure(tmp_path / "plots" / "f.png", fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed: pyplot would keep it alive otherwise
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]
