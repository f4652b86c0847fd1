"""What the command line says when something is off: a misspelled CMDB_* variable, a budget
that is no number, a broken link in an input folder, an output folder inside the input, a
warning from a library, a long run ahead; one clear line each, never silence or a traceback."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmdbnet import cli, weights
from cmdbnet.cli import app
from cmdbnet.cli.train import tensorboard_command
from cmdbnet.inference.rasters import expand_inputs
from cmdbnet.models import scan
from cmdbnet.models.scan import build, dispatch, native
from cmdbnet.settings import OTHER_VARIABLES


def _one_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("cmdb: error: ")
    return lines[0]


@pytest.mark.parametrize(("name", "nearest"), [("CMDB_TRAINING__BATCH", "CMDB_TRAIN__BATCH"),
                                               ("CMDB_SCAN_BACKEN", "CMDB_SCAN_BACKEND"),
                                               ("cmdb_modle__d_state", "CMDB_MODEL__D_STATE")])
def test_a_cmdb_variable_naming_no_setting_is_an_error_with_the_nearest_name(monkeypatch, name, nearest):
    monkeypatch.setenv(name, "2")
    line = _one_error(CliRunner().invoke(app, ["config", "show"]))
    assert line == f"cmdb: error: environment variable {name} names no setting; did you mean {nearest}?"


def test_the_other_cmdb_variables_are_the_ones_the_code_reads(monkeypatch):
    assert set(OTHER_VARIABLES) == {build.CACHE_ENV, dispatch.BACKEND_ENV, weights.URL_ENV}
    monkeypatch.setenv("CMDB_TRAIN__BATCH", "3")
    monkeypatch.setenv("CMDB_SCAN_BACKEND", "torch")
    res = CliRunner().invoke(app, ["config", "show", "--json"])
    assert res.exit_code == 0 and '"batch": 3' in res.stdout


@pytest.mark.parametrize("budget", ["inf", "nanGB", "-infGB"])
def test_a_budget_that_is_no_finite_size_is_one_error(budget):
    line = _one_error(CliRunner().invoke(app, ["profile-vram", "--budget", budget, "--device", "cpu"]))
    assert repr(budget) in line and ("finite" in line or "positive" in line)


def test_usage_errors_point_to_a_command_that_exists(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["cmdb", "config", "show", "-c", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].endswith("(see cmdb config show --help)")


def test_warnings_from_anywhere_are_one_cmdb_warning_line(monkeypatch, capsys, tmp_path):
    """The C scan cannot be built: doctor's warning is one line, no Python source excerpt."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it: restored after
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["cmdb", "doctor", "--json"])
    native._load.cache_clear()
    dispatch._native_or_torch.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            with pytest.raises(SystemExit):
                cli.main()
    finally:
        native._load.cache_clear()
        dispatch._native_or_torch.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("cmdb: warning: ") for line in err), err
    assert any("the C selective scan could not be built" in line for line in err)


def test_broken_links_in_an_input_folder_are_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.tif").write_bytes(b"")
    (folder / "gone.tif").symlink_to(tmp_path / "deleted.tif")
    (folder / "loop.tif").symlink_to(folder / "loop.tif")
    with pytest.warns(UserWarning) as caught:
        assert expand_inputs([folder]) == [folder / "good.tif"]
    assert sorted(str(w.message) for w in caught) == [
        f"{folder / 'gone.tif'} is a symbolic link to {tmp_path / 'deleted.tif'}, which does not exist; skipped",
        f"{folder / 'loop.tif'} is a symbolic link loop; skipped"]
    res = CliRunner().invoke(app, ["predict", str(folder / "gone.tif"), "-o", str(tmp_path / "o"), "-k",
                                   str(tmp_path / "x.pt")])
    assert "is a symbolic link to" in _one_error(res)


@pytest.mark.parametrize("inside", ["", "masks"])
def test_an_output_folder_in_the_input_folder_is_refused(tmp_path, inside):
    folder = tmp_path / "tiles"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"")
    out = folder / inside if inside else folder
    line = _one_error(CliRunner().invoke(app, ["predict", str(folder), "-o", str(out), "-k", str(tmp_path / "x.pt")]))
    assert f"the input folder {folder}: the masks would be read as inputs by the next run" in line
    assert not (folder / "masks").exists()


def test_the_tensorboard_command_is_quoted_for_the_shell():
    assert tensorboard_command(Path("Läufe/run 1")) == "tensorboard --logdir 'Läufe/run 1/tb'"


def test_broken_links_among_raw_tiles_are_named(tmp_path):
    from cmdbnet.data import raw
    from cmdbnet.data.registry import get_spec

    spec = get_spec("potsdam")
    band = next(b for b in spec.bands if b.name == "rgb")
    (tmp_path / "top_potsdam_2_10_RGB.tif").symlink_to(tmp_path / "moved_away.tif")
    with pytest.warns(UserWarning, match=r"top_potsdam_2_10_RGB.tif is a symbolic link to .*moved_away.tif, which "
                                         r"does not exist; skipped"):
        assert raw._images_in(spec, band, tmp_path) == []
