"""Every fenced shell command in README.md and docs/*.md names a module, file, flags, extras and
config fields that exist.

Commands are read from ```bash / ```sh / ```shell blocks (continuation lines joined, comments
dropped, split at &&, ||, ; and |). For each `python -m MODULE` and `python FILE.py`, the
command's `--help` is run once (it must exit 0 and show defaults) and every `--flag` the docs
use must appear in it; for `python -m cmil_jax.main`, `--config FILE[:VARIANT]` must load and
every `--config.a.b=...` must be a field of that config. `pip install -e '.[x]'` must name
extras of pyproject.toml, and `bash FILE` / `pytest PATH` files that exist.
"""

import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_LANGS = ("bash", "sh", "shell", "console")
SEPARATORS = {"&&", "||", ";", "|"}
PYTHONS = re.compile(r"^(\S*/)?python(3(\.\d+)?)?$")


def shell_blocks(path):
    """[(first line number, text)] of the fenced shell blocks of a markdown file."""
    blocks, current, start = [], None, 0
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                if current is None:
                    lang = stripped[3:].strip().lower()
                    current, start = ([] if lang in SHELL_LANGS else None), n + 1
                    if current is None:  # a non-shell block: skip to its end
                        current = False
                elif current is False:
                    current = None
                else:
                    blocks.append((start, "".join(current)))
                    current = None
            elif current not in (None, False):
                current.append(line)
    return blocks


def commands(text):
    """Token lists of the commands of a shell block."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#!"):
            continue
        tokens = [t for t in shlex.split(line, comments=True) if t.strip() and t != "..."]
        segment = []
        for t in tokens + [";"]:
            if t in SEPARATORS:
                out += _split_pythons(segment)
                segment = []
            else:
                segment.append(t)
    return [c for c in out if c]


def _split_pythons(tokens):
    """A segment may hold several python commands side by side (two-column examples)."""
    starts = [i for i, t in enumerate(tokens) if PYTHONS.match(t)]
    if not starts:
        return [tokens]
    return [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)])]


def _all_commands():
    found = []
    for doc in DOCS:
        for line, text in shell_blocks(doc):
            for cmd in commands(text):
                found.append(pytest.param(cmd, id=f"{doc}:{line}:{' '.join(cmd)[:60]}"))
    return found


ALL = _all_commands()


def _target(cmd):
    """('module', name) | ('file', path) | None for a python command."""
    if not PYTHONS.match(cmd[0]) or len(cmd) < 2:
        return None
    if cmd[1] == "-m":
        return ("module", cmd[2])
    if cmd[1].endswith(".py"):
        return ("file", cmd[1])
    return None


@functools.cache
def _help(kind, name):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", name] if kind == "module" else [sys.executable, name]
    result = subprocess.run(argv + ["--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def _flags(args):
    for t in args:
        t = t.strip("[]")
        if t.startswith("--"):
            yield t.split("=", 1)[0]


def _load_config(spec):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("docs_cfg", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _has_field(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@functools.cache
def _extras():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def test_the_docs_hold_commands():
    assert len(ALL) > 20
    modules = {_target(p.values[0]) for p in ALL} - {None}
    assert ("module", "cmil_jax.main") in modules and ("module", "data_prep.folders") in modules


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ALL)
def test_documented_command_exists(cmd):
    target = _target(cmd)
    if target is not None and target[1] in ("venv", "pip", "pytest"):
        target = None
    if target is not None:
        kind, name = target
        if kind == "module":
            assert importlib.util.find_spec(name) is not None, f"no module {name}"
        else:
            assert os.path.isfile(os.path.join(ROOT, name)), f"no file {name}"
        rc, text = _help(kind, name)
        # absl's --help (cmil_jax.main) exits with status 1 after printing the flags.
        assert rc == 0 or (rc == 1 and "\nflags:" in text), f"{name} --help failed:\n{text[-2000:]}"
        assert "default" in text, f"{name} --help shows no defaults"
        args = cmd[3:] if kind == "module" else cmd[2:]
        config = None
        for i, a in enumerate(args):
            if a == "--config" and i + 1 < len(args):
                config = args[i + 1]
            elif a.startswith("--config="):
                config = a.split("=", 1)[1]
        if name == "cmil_jax.main":
            from cmil_jax import config_base

            cfg = _load_config(config) if config else config_base.base_config()
        for flag in _flags(args):
            if name == "cmil_jax.main" and flag.startswith("--config."):
                field = flag[len("--config."):]
                assert _has_field(cfg, field), f"{config or 'base config'} has no field {field}"
                continue
            pattern = rf"--(\[no\])?{re.escape(flag[2:])}(?![\w-])"
            assert re.search(pattern, text), f"{name} --help does not list {flag}"
        return
    if cmd[0] == "pip" and "install" in cmd:
        for t in cmd:
            m = re.match(r"^\.\[([\w,-]+)\]$", t)
            if m:
                assert set(m.group(1).split(",")) <= _extras(), t
            assert not t.startswith("cmil_jax["), \
                f"{t} installs from an index, not this checkout: use -e '.[extra]'"
    elif cmd[0] == "bash" and len(cmd) > 1:
        assert os.path.isfile(os.path.join(ROOT, cmd[1])), f"no file {cmd[1]}"
    elif cmd[0] == "pytest":
        for t in cmd[1:]:
            if not t.startswith("-") and "/" in t:
                assert os.path.exists(os.path.join(ROOT, t.split("::")[0])), t


def test_main_help_lists_every_config_file():
    rc, text = _help("module", "cmil_jax.main")
    assert rc in (0, 1) and "\nflags:" in text
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        assert f"configs/{os.path.basename(path)}" in text, path


def test_commands_are_parsed_like_a_shell():
    text = ("python -m a --x 1 && pip install -e '.[test]'  # note\n"
            "python -m b --y \\\n    --config.z=3 | tee log\n")
    assert commands(text) == [["python", "-m", "a", "--x", "1"],
                              ["pip", "install", "-e", ".[test]"],
                              ["python", "-m", "b", "--y", "--config.z=3"], ["tee", "log"]]
    assert list(_flags(["[--ci]", "--a=1", "b"])) == ["--ci", "--a"]


def test_reproduce_md_compares_every_table_and_states_its_numbers():
    """docs/reproduce.md runs `cmil_jax.compare` for every table of cmil_jax/paper.py, and every
    number of the paper's tables appears in it."""
    from cmil_jax import paper

    doc = os.path.join("docs", "reproduce.md")
    compared = set()
    for _, block in shell_blocks(doc):
        for cmd in commands(block):
            if _target(cmd) == ("module", "cmil_jax.compare"):
                compared.add(cmd[cmd.index("--table") + 1])
    assert compared == set(paper.TABLES)
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    for table in paper.TABLES.values():
        for row, values in table.rows.items():
            for column, value in values.items():
                assert f"{value:.2f}" in text, (table.name, row, column)
