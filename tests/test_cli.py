"""The command line's own behaviour: one `error:` line per user error, choices, defaults read from the library."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main

from conftest import main_cli
from embedkit import cli
from embedkit.fairness.attributes import columns_of, parse_by
from embedkit.fairness.db import FairnessError
from embedkit.models.registry import MODELS
from embedkit.options import Amp, Ensemble, Head, LibraryDefault, Split


@pytest.mark.parametrize("args, code, says", [
    (["probe", "--model", "nope"], 1, "s (the folder does not exist): create one with `embedkit data import"),
    (["probe"], 2, "missing option '--model'"),
    (["probe", "--model", "x", "--head", "svm"], 2, "'--head': 'svm' is not one of 'lp', 'mlp', 'logreg'"),
    (["probe", "--model", "x", "--epochs", "many"], 2, "'--epochs'"),
    (["sql", "--format", "xml", "SELECT 1"], 2, "'xml' is not one of 'table', 'csv', 'json'"),
    (["runs", "--delete", "x"], 2, "no such option: --delete"),
    (["fairness", "--by", "sex*sex"], 2, "--by: no cell 'sex*sex'"),
    (["embed", "--model", "tiny-clip", "--weights", "w.pt", "--random-init"], 2, "exclude each other"),
    (["nonsense"], 2, "no such command 'nonsense'"),
])
def test_a_user_error_is_one_error_line(monkeypatch, capsys, tmp_path, args, code, says):
    exit_code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), *args)
    assert exit_code == code and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert says in err and "Traceback" not in err and "╭" not in err, err


def test_help_and_version_still_print(monkeypatch, capsys):
    code, out, _ = main_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "probe" in out and "sweep" in out
    code, out, _ = main_cli(monkeypatch, capsys, "probe", "--help")
    assert code == 0 and "<lp|mlp|logreg>" in out and "[default: " in out
    code, out, _ = main_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("embedkit ")


def test_help_imports_no_model_code():
    """Defaults and choices that live in torch-importing modules are read lazily: `embedkit --help` stays instant."""
    probe = ("import sys\nfrom embedkit import cli\nsys.argv = ['embedkit', '--help']\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr


def test_zeroshot_choices_are_every_familys():
    every_rule = dict.fromkeys(e for spec in MODELS.values() for e in spec.family.ensembles)
    assert tuple(Ensemble) == tuple(every_rule)


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_default_read_from_the_library_resolves_to_its_options_type():
    from embedkit.heads.probe import HeadConfig

    found = {}
    for path, command in _commands(typer.main.get_command(cli.app)):
        ctx = command.make_context("embedkit", [], resilient_parsing=True)
        for param in command.params:
            if isinstance(param.default, LibraryDefault):
                found[(*path, param.name)] = param.process_value(ctx, param.default())
    assert found[("probe", "epochs")] == HeadConfig.__dataclass_fields__["epochs"].default
    assert found[("probe", "head")] is Head.lp and found[("sweep", "by")] == "sex"
    assert found[("finetune", "amp")] is Amp.none and found[("report", "by")] == "sex,age_group"
    assert found[("report", "split")] is Split.test
    assert len(found) > 30


def test_by_names_attributes_and_cells():
    assert parse_by(" sex, age_group*sex ,sex*age_group,view,") == ["sex", "age_group_sex", "view"]
    assert parse_by(None) == [] and columns_of("age_group_sex") == ("age_group", "sex")
    assert columns_of("view") == ("view",)
    # any cell: the crossed columns (age_group*sex is the views' own column)
    assert parse_by("view*sex, age_group*sex*view") == ["view*sex", "age_group*sex*view"]
    assert columns_of("view*sex") == ("view", "sex")
    with pytest.raises(FairnessError, match="no cell 'sex\\*sex'.*two or more different attributes"):
        parse_by("sex*sex")
    with pytest.raises(FairnessError, match="no cell"):
        parse_by("age_group*")
