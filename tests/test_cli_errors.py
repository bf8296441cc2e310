"""The CLI's last line of defence: system errors and Ctrl-C become one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashlens.cli import main


def test_an_unwritable_output_path_is_one_line(
    stories_atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    code = main(["stats", str(stories_atlas), "--plot", str(a_file / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(a_file) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "resume"),
    [(["show", "ATLAS", "0:1"], False), (["map", "MODEL", "-o", "OUT"], True)],
)
def test_ctrl_c_promises_a_resume_only_where_a_rerun_resumes(
    argv: list[str],
    resume: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import flashlens.cli.map_cmd as map_cmd

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(map_cmd.Atlas, "open", stop)
    monkeypatch.setattr(map_cmd, "map_model", stop)
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and ("resume" in err) == resume


def test_a_neuron_and_a_matrix_option_that_disagree_are_refused(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(stories_atlas), "up:2:7", "--matrix", "down", "--json"]) == 2
    err = capsys.readouterr().err
    assert "names matrix 'up'" in err and "'down'" in err and "Traceback" not in err
    assert main(["show", str(stories_atlas), "up:2:7", "--matrix", "up", "--json"]) == 0
    assert '"matrix": "up"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["clamp", "MODEL", "--neuron", "0:1", "--concept", "dog", "--plot", "PLOT"],
        ["stats", "ATLAS", "--plot", "PLOT"],
        ["compare", "ATLAS", "ATLAS", "--plot", "PLOT"],
    ],
)
def test_every_plot_option_wants_a_png_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model and atlases do not exist: the file name is checked first, and nothing written.
    plot = tmp_path / "sub" / "dose.jpg"
    names = {"MODEL": str(tmp_path / "no-model"), "ATLAS": str(tmp_path / "no-atlas")}
    argv = [names.get(a, str(plot) if a == "PLOT" else a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "give a .png file name" in err and "Traceback" not in err
    assert not plot.exists()


def test_map_refuses_a_dtype_this_cpu_has_no_fast_kernel_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit --dtype int8 on a CPU without VNNI (its product ~100x slower than fp32 there)
    is one line naming the way out, before any work: no atlas folder is made."""
    from flashlens.decode import policy

    from .helpers import make_model

    model = make_model(tmp_path / "m", dtype=torch.bfloat16, tokenizer=None)
    capsys.readouterr()  # (what building the model printed)
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: False)
    monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(policy, "LOW_PRECISION_FLOPS", 1.0)  # this tiny job counts as big
    out = tmp_path / "atlas"
    assert main(["map", str(model), "-o", str(out), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype int8 has no fast kernel on this CPU" in err and "--dtype auto" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["map", str(model), "-o", str(out), "--json"]) == 0  # auto: fp32 here, maps
    assert '"compute_dtype": "float32"' in capsys.readouterr().out
