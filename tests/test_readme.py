"""The README's examples run, CI runs the README's test command, and the commands and links that the README
and the docs/ pages show are real."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def python_examples():
    """The README's Python blocks: the first inside a quickstart's parent folder (tests/test_cli.py runs it
    after its quickstart), the second anywhere."""
    blocks = _blocks("python")
    assert len(blocks) == 2
    return blocks


def test_python_example_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    exec(compile(python_examples()[1], "README.md", "exec"), {})


def test_the_quickstart_example_is_three_lines():
    assert len(python_examples()[0].strip().splitlines()) == 3


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_command_names_the_verb():
    assert any("sundae quickstart" in block and "pip install torch==2.13.0" in block for block in _blocks("bash"))


# --- The README and docs/ pages: their commands name real verbs and flags, their links lead somewhere ---

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)


def _shown_commands(text):
    """Shell command lines in a page: each line of its ```bash blocks (`\\` continuations joined) and each
    inline `code` span of its prose (a span may wrap across lines)."""
    for lang, block in FENCE.findall(text):
        if lang == "bash":
            yield from block.replace("\\\n", " ").splitlines()
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
        yield " ".join(span.split())


def _sundae_invocations(line):
    """The argument lists after `sundae` in one command line: `sundae VERB ...`, `python -m sundae VERB ...`
    and `torchrun ... -m sundae VERB ...`, each part of a `&&` / `;` / `|` chain on its own."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return
    segment = []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            for i, w in enumerate(segment):
                if w == "sundae" and (i == 0 or segment[i - 1] == "-m"):
                    yield segment[i + 1:]
                    break
            segment = []
        else:
            segment.append(word)


def _flags(args):
    return [a.split("=", 1)[0] for a in args if re.match(r"--?[A-Za-z]", a)]  # not "-", "--" or "-1"


def _check_invocation(parser, verbs, args):
    """Problems with one `sundae ...` argument list: an unknown verb or a flag its parser does not take."""
    global_flags = []
    while args and args[0].startswith("-"):  # `sundae --debug VERB ...`
        global_flags.append(args.pop(0))
    problems = [f"unknown global flag {f}" for f in _flags(global_flags) if f not in parser._option_string_actions]
    if not args or args[0].startswith("<") or not any(c.islower() for c in args[0]):  # `sundae`, VERB, <verb>
        return problems
    verb, rest = args[0], args[1:]
    if verb not in verbs:
        return problems + [f"unknown verb {verb!r}"]
    accepted = verbs[verb]._option_string_actions
    return problems + [f"{verb}: unknown flag {f}" for f in _flags(rest) if f not in accepted]


def _verb_parsers():
    import argparse
    from sundae.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def _problems(page_texts):
    parser, verbs = _verb_parsers()
    problems, seen = [], 0
    for name, text in page_texts:
        for line in _shown_commands(text):
            for args in _sundae_invocations(line):
                seen += 1
                problems += [(name, p, line) for p in _check_invocation(parser, verbs, list(args))]
    return problems, seen


def test_shown_commands_use_real_verbs_and_flags():
    problems, seen = _problems([(p.relative_to(ROOT), p.read_text()) for p in PAGES])
    assert seen > 30  # the pages do show commands, and the parsing above finds them
    assert not problems, "\n".join(f"{name}: {problem}: {line}" for name, problem, line in problems)


def test_the_command_check_catches_a_wrong_verb_or_flag():
    page = "\n".join([
        "```bash",
        "sundae sample --generator g.pt \\",         # a continued line: --nums is on the second half
        "    --out s --nums 4 --temperature=0.8",
        "torchrun --nproc_per_node=2 -m sundae trian --tokens t",
        "```",
        "and `python -m sundae --verbose inpaint --image a.png --maks m.png` inline; `sundae VERB --help` is fine",
    ])
    problems, seen = _problems([("page", page)])
    assert seen == 4
    assert [problem for _, problem, _ in problems] == [
        "sample: unknown flag --nums", "unknown verb 'trian'", "unknown global flag --verbose",
        "inpaint: unknown flag --maks"]


def test_relative_links_lead_to_files():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z][a-z0-9+.-]*:", path) and not (page.parent / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "\n".join(missing)


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size < 12_000  # reference sections belong in docs/
