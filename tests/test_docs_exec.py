"""Executable docs: README.md and docs/*.md are tested like code (issue 17, "Docs that are tested").

* **Every fenced block has a language**, so no command hides in an unlabelled block.
* **Shell commands.** Every command of a ``sh``/``bash``/``console`` block (in ``console`` blocks, the lines after
  ``$ ``) either runs here and must exit 0, or its block is marked not runnable on the line right before it::

      <!-- not-run: needs a GPU -->

  Runnable commands run in order, page by page (README.md first), in one workspace (a temporary folder holding
  copies of ``examples/`` and ``strategies.toml``; ``experiment.toml`` is ``examples/seed.toml`` placed at the
  root; ``expect.toml`` is the one docs/verification.md shows), with this interpreter's ``bin/`` first on PATH.
  They run at reduced size: :data:`REDUCED` sets size flags per ``moola-engine`` command (a flag the doc gives is
  replaced, any other is appended), :data:`PLACEHOLDERS` fills the names a reader substitutes.  Every
  ``moola-engine`` command, run or not, is also parsed by the CLI's own parser and the strategies it names must
  be tables of ``strategies.toml``.
* **TOML blocks** parse and structure against the class they show: an experiment config (``ExperimentConfig``,
  its ``[[sinks]]`` checked by the sinks' own parameters), ``strategies.toml`` tables (the registered plugins'
  parameters), ``expect.toml`` (verify's expectations), a plugin's ``pyproject.toml`` (the entry points of the
  tested package ``tests/plugin_pkg``).  Commented ``# key = value`` lines are options meant to be uncommented:
  the block must structure with them uncommented too.  A block that is deliberately partial says so with
  ``<!-- toml: partial, <reason> -->`` and is only parsed.
* **The configuration reference** in docs/index.md lists exactly the keys of ``ExperimentConfig`` (attrs fields,
  walked recursively) with their defaults.
* **Figures** that are cheap to recompute are recomputed here (data.md's split layout, its pretraining window
  count and its baseline tables); the others name the command that produced them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import ROOT

from moola_engine.config import ExperimentConfig, SinkConfig, structure, unstructure

DOCS = ROOT / "docs"
ARCHIVED = {"post-mortem.md": "the seed's own report, copied verbatim: a record, not this project's docs"}
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name not in ARCHIVED)]
SHELL = {"sh", "bash", "console"}

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(not-run|toml):\s*(.*?)\s*-->")

# Size flags per moola-engine command: a flag the doc gives is replaced, any other is appended (None: no value).
REDUCED: dict[str, list[tuple[str, str | None]]] = {
    # one epoch of 2,048 windows (16 steps): enough that the fresh-init detector accepts the encoder
    "pretrain": [("--epochs", "1"), ("--param", "samples_per_epoch=2048"), ("--param", "eval_windows=64")],
    # 12: two_phase unfreezes at epoch 10 (fewer epochs are refused) and expect.toml checks epochs 10 and 11
    "train": [("--epochs", "12")],
    "ablate": [("--seeds", "1"), ("--epochs", "12"), ("--no-figures", None)],
}
# `ablate --preset seed` without --config reads the checkout's examples/seed.toml (and so its artifacts/):
# in the workspace the same file is the workspace's copy.
PRESET_CONFIG = {"seed": "examples/seed.toml"}
# Names a reader fills in: RUN_A/RUN_B two runs, <control-run> a run folder name.
PLACEHOLDERS = {"RUN_A": "{first_run}", "RUN_B": "latest", "<control-run>": "latest"}
# Commands the workspace already satisfies.
SATISFIED = {". .venv/bin/activate": "this interpreter's bin/ is first on PATH"}


@attrs.frozen
class Block:
    page: Path
    line: int
    lang: str
    text: str
    marker: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    out = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            mk = MARKER.fullmatch(before)
            out.append(Block(page=page, line=text.count("\n", 0, m.start()) + 1, lang=m.group(1), text=m.group(2),
                             marker=(mk.group(1), mk.group(2)) if mk else None))
    return out


def commands(block: Block) -> list[str]:
    """The command lines of a shell block: comments dropped, ``\\`` continuations joined."""
    lines = block.text.splitlines()
    if block.lang == "console":
        picked, cont = [], False
        for line in lines:
            if line.startswith("$ ") or cont:
                picked.append(line[2:] if line.startswith("$ ") and not cont else line)
                cont = line.rstrip().endswith("\\")
        lines = picked
    out: list[str] = []
    for line in lines:
        line = re.sub(r"(^|\s+)#(\s.*)?$", "", line.rstrip())
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
        elif line.strip():
            out.append(line.strip())
    return out


def moola_args(segment: str) -> list[str] | None:
    """The arguments after ``moola-engine`` (or ``-m moola_engine.cli``, ``"$(which moola-engine)"``), else None."""
    import shlex

    tokens = shlex.split(segment)
    for i, tok in enumerate(tokens):
        if tok == "moola-engine" or tok.endswith("which moola-engine)"):
            return tokens[i + 1:]
        if tok == "-m" and tokens[i + 1:i + 2] == ["moola_engine.cli"]:
            return tokens[i + 2:]
    return None


def segments(command: str) -> list[str]:
    return [s.strip() for s in re.split(r"\s(?:&&|\|\||\||;)\s", command)]


def static_problems(command: str) -> list[str]:
    """Parse a moola-engine command with the CLI's parser; the strategies it names must exist."""
    import contextlib
    import io

    from moola_engine.cli import build_parser

    problems = []
    defined = {name for f in [ROOT / "strategies.toml", *sorted((ROOT / "examples").rglob("strategies.toml"))]
               for name in tomllib.loads(f.read_text())["strategy"]}  # the project's and the examples' own
    for seg in segments(command):
        args = moola_args(seg)
        if args is None:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = build_parser().parse_args(args)
        except SystemExit:
            problems.append(f"the CLI refuses it: {err.getvalue().strip().splitlines()[-1]}")
            continue
        names: list[str] = []
        if args[0] in ("train", "plan") and ns.strategy:
            names = [ns.strategy]
        elif args[0] == "ablate" and ns.strategies:
            names = ns.strategies.split(",")
        problems += [f"strategy {n!r} is not a table of strategies.toml (defined: {', '.join(sorted(defined))})"
                     for n in names if n not in defined]
        config = getattr(ns, "config", None)
        if config and not Path(config).is_absolute() and Path(config).parent != Path(".") \
                and not (ROOT / config).is_file():
            problems.append(f"--config {config}: no such file in the repository")
    return problems


def reduce(command: str, ws: Path) -> str:
    """The command at reduced size, with placeholders filled (see the module docstring)."""
    runs = sorted(p.name for p in (ws / "runs").glob("*-s[0-9]*") if p.is_dir()) if (ws / "runs").is_dir() else []
    for name, value in PLACEHOLDERS.items():
        command = command.replace(name, value.format(first_run=runs[0] if runs else "latest"))
    out = []
    for seg in re.split(r"(\s(?:&&|\|\||\||;)\s)", command):
        args = moola_args(seg) if seg.strip() not in ("&&", "||", "|", ";") else None
        if args:
            sub = args[0]
            for flag, value in REDUCED.get(sub, []):
                if value is not None and flag != "--param" and re.search(rf"(^|\s){flag}[ =]\S+", seg):
                    seg = re.sub(rf"(^|\s){flag}[ =]\S+", rf"\g<1>{flag} {value}", seg)
                elif value is None and re.search(rf"(^|\s){flag}(\s|$)", seg):
                    continue
                else:
                    seg += f" {flag}" + (f" {value}" if value is not None else "")
            if sub == "ablate" and "--preset" in args and "--config" not in args:
                seg += f" --config {PRESET_CONFIG[args[args.index('--preset') + 1]]}"
        out.append(seg)
    return "".join(out)


def shell_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang in SHELL]


# --------------------------------------------------------------------------- fast: the shape of the docs


def test_docs_holds_pages_only() -> None:
    """Pages, and the images a page shows; scripts, logs and measurements live beside the benchmarks."""
    pages = "".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))
    others = [p.relative_to(ROOT) for p in DOCS.rglob("*") if p.is_file() and p.suffix != ".md"
              and not (p.suffix in {".png", ".svg"} and p.name in pages)]
    assert not others, f"docs/ holds pages only; move these beside the benchmarks (benchmarks/): {others}"


def test_every_fenced_block_has_a_language() -> None:
    bare = [b.where for b in blocks() if not b.lang]
    assert not bare, f"fenced blocks without a language (sh, console, toml, text, python...): {bare}"


def test_every_shell_command_runs_or_says_why_not() -> None:
    problems = []
    for b in shell_blocks():
        if b.marker and b.marker[0] == "not-run":
            if not b.marker[1]:
                problems.append(f"{b.where}: <!-- not-run: ... --> needs a reason")
            continue
        for cmd in commands(b):
            if cmd in SATISFIED:
                continue
            if moola_args(cmd) is None:
                problems.append(f"{b.where}: {cmd!r} is not a moola-engine command this test knows how to run: "
                                "mark the block <!-- not-run: reason --> or teach tests/test_docs_exec.py")
    assert not problems, "\n".join(problems)


def test_every_moola_engine_command_in_the_docs_parses() -> None:
    problems = [f"{b.where}: {cmd}: {p}" for b in shell_blocks() for cmd in commands(b) for p in static_problems(cmd)]
    assert not problems, "\n".join(problems)


def test_reduce_replaces_or_appends_size_flags(tmp_path: Path) -> None:
    assert reduce("moola-engine train --config e.toml --epochs 30", tmp_path) == \
        "moola-engine train --config e.toml --epochs 12"
    assert reduce('moola-engine ablate --preset seed --seeds 5 && echo "ok"', tmp_path) == \
        'moola-engine ablate --preset seed --seeds 1 --epochs 12 --no-figures --config examples/seed.toml && echo "ok"'
    assert reduce("moola-engine verify runs/<control-run>/", tmp_path) == "moola-engine verify runs/latest/"


def test_commands_are_read_as_a_shell_would() -> None:
    b = Block(page=ROOT / "README.md", line=1, lang="console", marker=None,
              text="$ moola-engine a \\\n    --b 1   # note\nout put\n$ moola-engine c\n")
    assert commands(b) == ["moola-engine a --b 1", "moola-engine c"]


# --------------------------------------------------------------------------- TOML blocks

COMMENTED_OPTION = re.compile(r"^#\s?((\[\[?[\w.\-]+\]\]?|[\w.\-]+\s*=).*)$", re.M)


def toml_kind(text: str) -> str:
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if first.startswith("#") and first.rstrip().endswith("pyproject.toml"):
        return "pyproject"
    data = tomllib.loads(COMMENTED_OPTION.sub(r"\1", text))
    if "expect" in data or "weights" in data:
        return "expect"
    if "strategy" in data or first.rstrip().endswith("strategies.toml"):
        return "strategies"
    return "experiment"


def check_toml(text: str, source: str, tmp: Path) -> None:
    """Structure one TOML text against the class its kind shows; a failure raises (ConfigError, AssertionError)."""
    from moola_engine.checks.verify import Expectations
    from moola_engine.config import parse_toml
    from moola_engine.core.plugins import build_plugin_manager, load_strategies
    from moola_engine.runs.sinks import check_sinks

    data = parse_toml(text, source)
    kind = toml_kind(text)
    if kind == "pyproject":
        tested = tomllib.loads((ROOT / "tests" / "plugin_pkg" / "pyproject.toml").read_text())["project"]
        for group, entries in data["project"]["entry-points"].items():
            assert entries.items() <= tested["entry-points"][group].items(), \
                f"{source}: entry points {entries} are not those of the tested package tests/plugin_pkg"
    elif kind == "expect":
        structure(data, Expectations, source=source)
    elif kind == "strategies":
        path = tmp / "strategies.toml"
        path.write_text(text, encoding="utf-8")
        _, registry = build_plugin_manager()
        load_strategies(path, registry)
    else:
        cfg = structure(data, ExperimentConfig, source=source)
        if "sinks" in data:
            pm, _ = build_plugin_manager()
            check_sinks(cfg, pm)


def toml_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "toml"]


@pytest.fixture
def plugin_pkg_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' own plugin (writing-plugins.md), installed as tests/test_plugins.py installs it."""
    from test_plugins import PKG, install_on_path

    site = tmp_path / "site"
    site.mkdir()
    install_on_path(PKG, site)
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: b.where)
def test_toml_block_structures(block: Block, tmp_path: Path, plugin_pkg_installed: None) -> None:
    if block.marker and block.marker[0] == "toml":
        assert block.marker[1].startswith("partial"), f"{block.where}: unknown marker {block.marker}"
        tomllib.loads(block.text)
        return
    check_toml(block.text, block.where, tmp_path)
    uncommented = COMMENTED_OPTION.sub(r"\1", block.text)
    if uncommented != block.text:
        check_toml(uncommented, f"{block.where} (commented options uncommented)", tmp_path)


def test_toml_check_catches_a_misplaced_option(tmp_path: Path) -> None:
    from moola_engine.errors import ConfigError

    text = '[[expect]]\ngroup = "g"\n\n[weights]\nmin_loaded = 8\n# require_finished = true\n'
    check_toml(text, "t", tmp_path)
    with pytest.raises(ConfigError, match="require_finished"):
        check_toml(COMMENTED_OPTION.sub(r"\1", text), "t", tmp_path)


# --------------------------------------------------------------------------- the configuration reference

REQUIRED = "required"


def _attrs_inside(tp: Any) -> tuple[type | None, bool, bool]:
    """(attrs class inside ``tp`` or None, is it a list, is it optional)."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return (inner if attrs.has(inner) else None), True, optional
    return (tp if isinstance(tp, type) and attrs.has(tp) else None), False, optional


def config_keys(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Every key an experiment file accepts -> its default as TOML would write it (None: absent)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        if f.metadata.get("toml", True) is False:
            continue
        if cls is SinkConfig and f.name == "options":
            continue  # a sink's options sit beside its name (config._structure_sink), they are not one key
        key = prefix + f.name
        if f.default is attrs.NOTHING:
            default: Any = REQUIRED
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f.default.factory()
        else:
            default = f.default
        inner, is_list, optional = _attrs_inside(hints[f.name])
        if not (inner is not None and not is_list and not optional):  # an always-present table is no key itself
            out[key] = default if default in (None, REQUIRED) else unstructure(default)
        if inner is not None:
            out.update(config_keys(inner, key + ("[]." if is_list else ".")))
    return out


def reference_rows() -> dict[str, tuple[str, str]]:
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in re.finditer(r"^\| `([^`]+)` \|([^|]*)\|(.*)\|$", section, re.M):
        assert m.group(1) not in rows, f"docs/index.md lists {m.group(1)} twice"
        rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def parse_default(cell: str) -> Any:
    if cell in ("none", REQUIRED):
        return None if cell == "none" else REQUIRED
    m = re.fullmatch(r"`(.+)`", cell)
    assert m, f"a default is a TOML value in backticks, none or required, got {cell!r}"
    return tomllib.loads(f"v = {m.group(1)}")["v"]


def test_config_reference_lists_every_key_with_its_default() -> None:
    keys, rows = config_keys(), reference_rows()
    missing = sorted(set(keys) - set(rows))
    extra = sorted(set(rows) - set(keys))
    assert not missing, f"docs/index.md's configuration reference omits {missing}"
    assert not extra, f"docs/index.md's configuration reference lists keys the config does not accept: {extra}"
    wrong = []
    for key, default in keys.items():
        try:
            documented = parse_default(rows[key][0])
        except (AssertionError, tomllib.TOMLDecodeError) as exc:
            wrong.append(f"{key}: {exc}")
            continue
        if documented != default or type(documented) is not type(default):
            wrong.append(f"{key}: documented {rows[key][0]}, the code's default is {default!r}")
    assert not wrong, "\n".join(wrong)


def test_config_reference_names_every_choice() -> None:
    rows, missing = reference_rows(), []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in attrs.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Literal:
                missing.extend(f"{prefix}{f.name}: {c!r}" for c in typing.get_args(tp)
                               if f'"{c}"' not in " ".join(rows.get(prefix + f.name, ("", ""))))
            inner, is_list, _ = _attrs_inside(tp)
            if inner is not None:
                walk(inner, prefix + f.name + ("[]." if is_list else "."))

    walk(ExperimentConfig, "")
    assert "mps" in rows["train.device"][1]
    assert not missing, f"choices the reference does not name: {missing}"


def test_config_walk_sees_nested_and_required_keys() -> None:
    keys = config_keys()
    assert keys["train.early_stopping"] is None and keys["train.early_stopping.patience"] == 10
    assert keys["model.groups[].name"] == REQUIRED and keys["sinks"] == [{"name": "csv"}]
    assert "run" not in keys and "source" not in keys and "sinks[].options" not in keys


# --------------------------------------------------------------------------- claims in prose


def test_demo_seed_count_in_ablation_md() -> None:
    from moola_ohlc.plugin import seed_preset

    text = (DOCS / "ablation.md").read_text(encoding="utf-8")
    said = re.findall(r"seed preset on (\d+) seeds", text)
    assert said and all(int(n) == seed_preset().demo_seeds for n in said), (said, seed_preset().demo_seeds)


def test_gradient_guard_norm_in_reliability_md() -> None:
    source = (ROOT / "moola_engine" / "core" / "engine.py").read_text(encoding="utf-8")
    orders = re.findall(r"_foreach_norm\(\s*\[[^\]]*\],\s*(\w+)\)", source)
    assert orders, "the engine's gradient guard (torch._foreach_norm) is not where this test looks"
    text = (DOCS / "reliability.md").read_text(encoding="utf-8")
    documented = re.findall(r"_foreach_norm\(grads, (\w+)\)", text)
    assert documented and set(documented) == {o.replace("math.", "") for o in orders}, (documented, orders)
    assert ("L2" in text) == ("2" in orders), "reliability.md names the guard's norm wrongly"
    # the default guard's once-an-epoch probe of the trained weights (core/guards.py)
    guards = (ROOT / "moola_engine" / "core" / "guards.py").read_text(encoding="utf-8")
    probe = re.findall(r"_foreach_norm\(weights, (\w+)\)", guards)
    assert probe and set(re.findall(r"_foreach_norm\(weights, (\w+)\)", text)) == set(probe), probe
    assert re.search(r'grad_guard: Literal\["epoch", "step"\] = "epoch"',
                     (ROOT / "moola_engine" / "config.py").read_text(encoding="utf-8")), "the default guard moved"
    assert '`"epoch"` (the default)' in text


def test_strategies_file_resolves_against_the_experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from moola_engine.cli import main

    (tmp_path / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sub" / "exp.toml").write_text('[run]\nstrategies_file = "mine.toml"\n')
    (tmp_path / "sub" / "mine.toml").write_text('[strategy.mine]\nplugin = "immediate"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["plan", "--config", "../sub/exp.toml", "--strategy", "mine", "--epochs", "2"]) == 0
    assert capsys.readouterr().out.startswith("strategy mine: 2 epochs")
    assert "relative to the experiment file" in reference_rows()["run.strategies_file"][1]


REPO_PATH = re.compile(r"`((?:moola_engine|ohlc|tests|benchmarks|examples|docs|plugins)/[\w./\-*]+?)(?:::[\w.]+)?`")


def test_pages_point_inside_the_repository() -> None:
    problems = []
    for page in [*PAGES, ROOT / "ohlc" / "README.md"]:
        text = page.read_text(encoding="utf-8")
        problems += [f"{page.relative_to(ROOT)}: {m.group(0)} points outside the repository"
                     for m in re.finditer(r"[`(](?:/work/)?shared/[^`)\s]*", text)]
        for m in REPO_PATH.finditer(text):
            path = m.group(1).rstrip(".")
            if "*" in path or "<" in path:
                if not list(ROOT.glob(path)):
                    problems.append(f"{page.relative_to(ROOT)}: {path} matches no file")
            elif not (ROOT / path).exists():
                problems.append(f"{page.relative_to(ROOT)}: {path} does not exist")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the docs site


def test_mkdocs_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the dev extra installs it: make setup)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert all(f": {p.name}" in nav for p in DOCS.glob("*.md")), "a page is missing from mkdocs.yml's nav"


# --------------------------------------------------------------------------- figures recomputed


def test_data_md_figures_are_recomputed(capsys: pytest.CaptureFixture[str]) -> None:
    from moola_engine.cli import main
    from moola_engine.config import load_config
    from moola_ohlc.options import PretrainConfig
    from moola_ohlc.pretrain import build_pretrain_data
    from moola_ohlc.series import build_dataset, parse_options, pretrain_cut_date, read_ohlc, resolve_series, target_series

    text = (DOCS / "data.md").read_text(encoding="utf-8")
    cfg = load_config(ROOT / "examples" / "seed.toml")
    opts = parse_options(cfg.data.options, cfg.source)
    series = target_series(opts, None, cfg.base_dir)
    pool = build_dataset(series, parse_options({**cfg.data.options, "label_budget": "all"}, cfg.source),
                         val_fraction=cfg.data.val_fraction).meta()["splits"]
    budget = cfg.data.options["label_budget"]
    stride = cfg.data.options["eval_stride"]
    for name, label, note in [("train", "train (pool)", f"({budget} labeled drawn)"), ("val", "val", f"(stride {stride})"),
                              ("test", "test", f"(stride {stride})")]:
        s = pool[name]
        row = (f"| {label} | {s['first_end']} .. {s['last_end']} | {s['first_bar']} .. {s['last_bar']} | "
               f"{s['windows']} {note} |")
        assert row in text, f"docs/data.md's layout table lacks {row}"
    cut = pretrain_cut_date(series, opts, val_fraction=cfg.data.val_fraction, folds=cfg.data.folds)
    others = [read_ohlc(resolve_series(n, cfg.base_dir), name=n) for n in opts.pretrain if n != series.name]
    pc = PretrainConfig()
    data = build_pretrain_data([series, *others], opts.spec, cut, stride=pc.stride,
                               holdout_fraction=pc.holdout_fraction)
    assert f"{int((~data.holdout).sum()):,} training windows" in text and f"up to {cut})" in text

    def baseline(*extra: str) -> dict[str, tuple[str, str]]:
        assert main(["baseline", "--config", str(ROOT / "examples" / "seed.toml"), *extra]) == 0
        out = capsys.readouterr().out
        return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^(\w+)\s+([\d.]+)\s+([\d.]+-[\d.]+)$", out, re.M)}

    seeds = re.search(r"moola-engine baseline --config examples/seed.toml --seeds (\d+)", text)
    assert seeds
    b = baseline("--seeds", seeds.group(1))
    for split, label in [("val", "validation"), ("test", "test")]:
        row = (f"| {label} | {b[f'{split}_accuracy'][0]} ({b[f'{split}_accuracy'][1]}) | "
               f"{b[f'{split}_balanced_accuracy'][0]} | {b[f'{split}_auc'][0]} ({b[f'{split}_auc'][1]}) | "
               f"{b[f'{split}_majority_rate'][0]} |")
        assert row in text, f"docs/data.md's baseline table lacks {row}"
    everything = baseline("--seeds", "1", "--label-budget", "all")
    assert (f"test accuracy {everything['test_accuracy'][0]}, AUC {everything['test_auc'][0]}" in text
            and f"With all {pool['train']['windows']:,} training windows" in text)


# --------------------------------------------------------------------------- running the commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("docs-ws")
    shutil.copytree(ROOT / "examples", ws / "examples")
    shutil.copy(ROOT / "strategies.toml", ws / "strategies.toml")
    # experiment.toml: the seed's experiment at the workspace root (its ../ paths become paths beside it)
    (ws / "experiment.toml").write_text((ROOT / "examples" / "seed.toml").read_text().replace('"../', '"'))
    expect = next(b for b in blocks([DOCS / "verification.md"]) if b.lang == "toml" and "[[expect]]" in b.text)
    (ws / "expect.toml").write_text(expect.text)
    return ws


@pytest.mark.slow
def test_every_runnable_shell_command_in_the_docs_exits_0(workspace: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MOOLA_DEBUG", None)
    failures, ran = [], 0
    for b in shell_blocks():
        if b.marker and b.marker[0] == "not-run":
            continue
        for cmd in commands(b):
            if cmd in SATISFIED:
                continue
            reduced = reduce(cmd, workspace)
            proc = subprocess.run(["bash", "-c", reduced], cwd=workspace, env=env, capture_output=True, text=True,
                                  timeout=600, stdin=subprocess.DEVNULL)
            ran += 1
            if proc.returncode != 0:
                tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
                failures.append(f"{b.where}: {cmd}\n  ran: {reduced}\n  exit {proc.returncode}:\n    {tail}")
    assert ran > 10
    assert not failures, "\n".join(failures)
