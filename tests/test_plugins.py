"""Plugin discovery, validation and the strategies.toml error messages (exact lines)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from moola_engine import hookimpl
from moola_engine.core.plugins import build_plugin_manager, load_strategies, register_checked, select_strategy
from moola_engine.errors import ConfigError, PluginError

PKG = ROOT / "tests" / "plugin_pkg"


def install_on_path(pkg_dir: Path, dest: Path) -> None:
    """Put a package and its dist-info metadata (from its own pyproject) on sys.path, as an install would."""
    meta = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    for package in tomllib.loads((pkg_dir / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]:
        shutil.copytree(pkg_dir / package, dest / package)
    info = dest / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
        for group, entries in meta["entry-points"].items()
    )
    (info / "entry_points.txt").write_text(eps)


def write_dist(dest: Path, name: str, entry: str, target: str, modules: dict[str, str]) -> None:
    for mod, text in modules.items():
        (dest / f"{mod}.py").write_text(text)
    info = dest / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[moola_engine]\n{entry} = {target}\n")


def test_builtins_are_discovered_through_entry_points() -> None:
    _, registry = build_plugin_manager()
    assert {"frozen", "immediate", "two-phase"} <= set(registry.names())
    assert registry["two-phase"].source.startswith("moola-engine ")


def test_third_party_plugin_selected_by_name_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_on_path(PKG, site)
    monkeypatch.syspath_prepend(str(site))
    _, registry = build_plugin_manager()
    assert registry["plateau-thaw"].source == "my-freeze-plugins 0.1.0"
    toml = tmp_path / "strategies.toml"
    toml.write_text('[strategy.thaw]\nplugin = "plateau-thaw"\npatience = 3\n')
    strat = select_strategy("thaw", load_strategies(toml, registry), str(toml))
    assert strat.plugin == "plateau-thaw"
    assert strat.params.patience == 3
    assert strat.build().params.patience == 3


@pytest.mark.slow
def test_third_party_plugin_really_installed_with_pip(tmp_path: Path) -> None:
    """pip installs the package (its own pyproject) into a target dir; a fresh process discovers it."""
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(PKG)],
        check=True, capture_output=True,
    )
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from moola_engine.core.plugins import build_plugin_manager\n"
        "_, r = build_plugin_manager(); print(r['plateau-thaw'].source)\n" % str(target)
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "my-freeze-plugins 0.1.0"


def test_plugin_that_fails_to_load_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dist(tmp_path, "broken-plugin", "boom", "broken_mod", {"broken_mod": "raise ImportError('no numpy 3')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        build_plugin_manager()
    assert str(err.value) == 'failed to load plugin "broken-plugin[boom]": ImportError: no numpy 3'


def test_misspelled_hook_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "from moola_engine import hookimpl\n"
        "@hookimpl\n"
        "def on_epoch_strat(engine, epoch):\n"
        "    pass\n"
    )
    write_dist(tmp_path, "typo-plugin", "typo", "typo_mod", {"typo_mod": text})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        build_plugin_manager()
    msg = str(err.value)
    assert msg.startswith('plugin "typo-plugin[typo]": ')
    assert "unknown hook 'on_epoch_strat'" in msg


def test_misspelled_argument_is_an_error() -> None:
    class Bad:
        @hookimpl
        def on_epoch_start(self, engine, epoc):  # type: ignore[no-untyped-def]
            pass

    pm, _ = build_plugin_manager()
    with pytest.raises(PluginError) as err:
        register_checked(pm, Bad(), name="bad")
    assert str(err.value).startswith('plugin "bad": ')
    assert "epoc" in str(err.value)


def test_two_plugins_registering_one_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "from moola_engine import hookimpl\n"
        "class S:\n    pass\n"
        "@hookimpl\n"
        "def register_strategies(register):\n"
        "    register('frozen', S)\n"
    )
    write_dist(tmp_path, "clash-plugin", "clash", "clash_mod", {"clash_mod": text})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match='strategy plugin "frozen" is registered twice: by .* and by clash-plugin 1.0'):
        build_plugin_manager()


# --------------------------------------------------------------------------- strategies.toml errors, exact lines


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "strategies.toml"
    path.write_text(text)
    _, registry = build_plugin_manager()
    load_strategies(path, registry)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    return str(err.value).replace(str(tmp_path) + "/", "")


def test_wrong_type(tmp_path: Path) -> None:
    assert _error(tmp_path, '[strategy.two_phase]\nplugin = "two-phase"\nunfreeze_after = "ten"\n') == (
        "strategies.toml: invalid value, expected an integer, got str 'ten' @ $.strategy.two_phase.unfreeze_after"
    )


def test_missing_key(tmp_path: Path) -> None:
    assert _error(tmp_path, "[strategy.two_phase]\nunfreeze_after = 10\n") == (
        "strategies.toml: required field missing @ $.strategy.two_phase.plugin"
    )


def test_unknown_key(tmp_path: Path) -> None:
    assert _error(tmp_path, '[strategy.two_phase]\nplugin = "two-phase"\nlr_mul = 0.3\n') == (
        "strategies.toml: extra fields found (lr_mul) @ $.strategy.two_phase"
    )


def test_two_problems_listed_together(tmp_path: Path) -> None:
    text = '[strategy.two_phase]\nplugin = "two-phase"\nunfreeze_after = "ten"\nlr_mul = 0.3\n'
    assert _error(tmp_path, text) == (
        "strategies.toml: 2 problems\n"
        "  - invalid value, expected an integer, got str 'ten' @ $.strategy.two_phase.unfreeze_after\n"
        "  - extra fields found (lr_mul) @ $.strategy.two_phase"
    )


def test_invalid_value(tmp_path: Path) -> None:
    assert _error(tmp_path, '[strategy.two_phase]\nplugin = "two-phase"\nlr_scale = 0\n') == (
        "strategies.toml: invalid value, expected a value > 0, got 0.0 @ $.strategy.two_phase.lr_scale"
    )


def test_unknown_plugin(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[strategy.x]\nplugin = "two-phse"\n')
    assert msg.startswith('strategies.toml: unknown plugin "two-phse" @ $.strategy.x.plugin; installed plugins: ')
    assert msg.endswith('; did you mean "two-phase"?')
    assert "frozen" in msg and "immediate" in msg


def test_unknown_strategy(tmp_path: Path) -> None:
    path = tmp_path / "strategies.toml"
    path.write_text('[strategy.two_phase]\nplugin = "two-phase"\n[strategy.frozen]\nplugin = "frozen"\n')
    _, registry = build_plugin_manager()
    named = load_strategies(path, registry)
    with pytest.raises(ConfigError) as err:
        select_strategy("two_phse", named, "strategies.toml")
    assert str(err.value) == (
        '--strategy: unknown strategy "two_phse"; defined in strategies.toml: frozen, two_phase; did you mean "two_phase"?'
    )


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    msg = _error(tmp_path, "[strategy.two_phase\n")
    assert msg.startswith("strategies.toml: invalid TOML: ")


def test_shipped_strategies_file_loads() -> None:
    _, registry = build_plugin_manager()
    named = load_strategies(ROOT / "strategies.toml", registry)
    assert {"frozen", "immediate", "two_phase"} <= set(named)


# --------------------------------------------------------------------------- which strategies.toml


def test_strategies_file_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--strategies; run.strategies_file (relative to the config); beside the config; ./; the project's."""
    from moola_engine.config import load_config
    from moola_engine.runs.train import resolve_strategy, strategies_path

    exp, cwd = tmp_path / "exp", tmp_path / "cwd"
    exp.mkdir()
    cwd.mkdir()
    for folder, scale in ((exp, 0.25), (cwd, 0.5)):
        (folder / "strategies.toml").write_text(
            f'[strategy.tp]\nplugin = "two-phase"\nunfreeze_after = 1\nlr_scale = {scale}\n')
    (exp / "exp.toml").write_text('[run]\nconsole = "none"\n')
    monkeypatch.chdir(cwd)
    cfg = load_config(exp / "exp.toml")
    # beside the experiment file wins over the working directory (was: ./strategies.toml, silently)
    assert strategies_path(cfg, None) == exp / "strategies.toml"
    _, chosen = resolve_strategy(cfg, "tp", None)
    assert chosen.params.lr_scale == 0.25 and chosen.source == str(exp / "strategies.toml")
    # --strategies FILE first of all
    assert strategies_path(cfg, "other.toml") == Path("other.toml")
    # run.strategies_file, relative to the experiment file
    (exp / "sub").mkdir()
    (exp / "exp2.toml").write_text('[run]\nconsole = "none"\nstrategies_file = "sub/mine.toml"\n')
    assert strategies_path(load_config(exp / "exp2.toml"), None) == exp / "sub" / "mine.toml"
    # none beside the config: the working directory's, then the project's
    (exp / "strategies.toml").unlink()
    assert strategies_path(cfg, None) == cwd / "strategies.toml"
    (cwd / "strategies.toml").unlink()
    assert strategies_path(cfg, None) == ROOT / "strategies.toml"


# --------------------------------------------------------------------------- the strategy protocol


PROTOCOL_PLUGIN = '''
from moola_engine import hookimpl


class Strategy:
    """test strategy"""

    def __init__(self, params):
        self.params = params

{body}

    @hookimpl
    def on_fit_start(self, engine):
        pass


@hookimpl
def register_strategies(register):
    register("proto", Strategy)
'''


@pytest.mark.parametrize(("body", "message"), [
    ("    def promised_group(self, groups, head_groups):\n        return groups",
     "method 'promised_group' is not part of the strategy protocol; did you mean \"promised_groups\"?"),
    ("    def validate_schedul(self, epochs, groups, head_groups):\n        return []",
     "did you mean \"validate_schedule\"?"),
    ("    def validate_schedule(self, epochs, groups):\n        return []",
     "validate_schedule(self, epochs, groups) must take (self, epochs, groups, head_groups)"),
    ("    def on_epoch_strat(self, engine, epoch):\n        pass",
     "did you mean \"on_epoch_start\"?"),
    ("    overrides = 'late-transition'", "overrides must be a list of names"),
], ids=["misspelled-promise", "misspelled-validate", "misshaped-validate", "undecorated-hook-typo", "overrides"])
def test_a_strategy_with_a_misspelled_or_misshaped_protocol_method_is_refused_at_registration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str) -> None:
    mod = f"proto_mod_{abs(hash(body))}"  # a module name per case: sys.modules keeps the first import
    write_dist(tmp_path, "proto-plugin", "proto", mod, {mod: PROTOCOL_PLUGIN.format(body=body)})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        build_plugin_manager()
    assert str(err.value).startswith('strategy "proto" from proto-plugin 1.0: ')
    assert message in str(err.value)


def test_a_well_formed_strategy_protocol_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = ("    overrides = ('late-transition',)\n\n"
            "    def validate_schedule(self, epochs, groups, head_groups):\n        return []\n\n"
            "    def promised_groups(self, groups, head_groups):\n        return groups\n\n"
            "    def plan_notes(self):\n        return ['ok']\n\n"
            "    def helper_for_my_own_use(self):\n        return 1")
    write_dist(tmp_path, "proto-plugin", "proto", "proto_ok_mod", {"proto_ok_mod": PROTOCOL_PLUGIN.format(body=body)})
    monkeypatch.syspath_prepend(str(tmp_path))
    _, registry = build_plugin_manager()
    assert registry["proto"].source == "proto-plugin 1.0"


def test_a_factory_function_is_checked_when_the_strategy_is_built() -> None:
    from moola_engine.core.plugins import NamedStrategy, NoParams, StrategyInfo

    class Bad:
        def plan_note(self) -> list[str]:
            return []

    info = StrategyInfo(kind="strategy", name="fn", factory=lambda params: Bad(), params=NoParams, description="", source="test")
    named = NamedStrategy(name="fn", plugin="fn", params=NoParams(), description="", info=info, source="x")
    with pytest.raises(PluginError, match='strategy "fn" from test: .*did you mean "plan_notes"'):
        named.build()
