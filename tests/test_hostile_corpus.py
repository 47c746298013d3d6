"""Every case of the hostile-input corpus (tests/hostile_*.py) through the real CLI: one line, nothing changed."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from hostile import Case, build_store, copy_store, embedkit, snapshot

_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("hostile_*.py"))
CASES: dict[str, Case] = {}
for _module in _MODULES:
    for _case in importlib.import_module(_module).CASES:
        assert _case.name not in CASES, f"two cases named {_case.name}"
        CASES[_case.name] = _case


@pytest.fixture(scope="session")
def template_stores(tmp_path_factory):
    """Each kind of starting store, built once (a case works on its own copy)."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_store(kind, tmp_path_factory.mktemp(f"template-{kind}"))
        return built[kind]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_and_changes_nothing(tmp_path, template_stores, name):
    case = CASES[name]
    store = copy_store(template_stores(case.store), tmp_path / "store")
    if case.setup is not None:
        case.setup(tmp_path, store)
    before = snapshot(store)
    args = [a.format(tmp=tmp_path, store=store) for a in case.args]
    env = {k: v.format(tmp=tmp_path, store=store) for k, v in case.env.items()}
    result = embedkit(store, args, env=env)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == case.code, (result.returncode, result.stderr, result.stdout[-2000:])
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.stderr
    message = " ".join(lines)
    assert case.reason in message, message
    assert case.names.format(tmp=tmp_path, store=store) in message, message
    assert snapshot(store) == before, "the store changed"
