"""Cache keys follow the code that computes a record, not its text (garden.cache, garden.codehash).

Each test edits producing modules' source as a person would (a comment, a docstring, a reformat, a log
line, a move, a refactor of a loop; or a kernel constant, the trainer's learning rule, a scorer, a
family) and checks which caches' keys move: text edits move none, a computation edit moves its own.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from garden import cache, codehash, families
from garden.evaluation.stage import EvaluationPlan
from garden.extract import ExtractionPlan

Edit = Callable[[str], str]


@pytest.fixture
def edited(monkeypatch):
    """`edit({module: edit})`: the producers' source as if those modules had been edited so."""
    original = codehash.module_source

    def edit(edits: dict[str, Edit]) -> None:
        monkeypatch.setattr(
            codehash, "module_source", lambda name: edits.get(name, lambda text: text)(original(name))
        )
        cache.clear_versions()

    yield edit
    monkeypatch.undo()
    cache.clear_versions()


@pytest.fixture(scope="module")
def configs():
    """The default settings and paper 003's, composed once (only the code changes between keys)."""
    from hydra import compose, initialize_config_dir

    from garden.config import config_dir
    from garden.settings import resolve

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return resolve(compose("config")), resolve(compose("config", ["experiment=cooccurrence"]))


def _keys(configs) -> dict[str, str]:
    from garden.cooccurrence import run_config_hash
    from garden.tiny import series_fingerprint

    cfg, paper = configs
    plan = ExtractionPlan(tensor="embed_out.weight", steps=(0, 1, 2), reference_step=0)
    scores = EvaluationPlan(("perplexity",), (0, 1), "cpu", "float32", 4, 16, None, None, 8, 0)
    ranks = EvaluationPlan(("stability",), (0, 1), "cpu", "float32", 4, 16, None, None, 8, 0)
    return {
        "tiny": series_fingerprint(cfg.model, cfg.corpus),
        "extract": plan.cache_key("local:/x"),
        "evaluate": scores.cache_key("local:/x", "data", "final"),
        "evaluate gpt_neox": ranks.cache_key("local:/x", "data", "final", families.get("gpt_neox")),
        "evaluate olmo2": ranks.cache_key("local:/x", "data", "final", families.get("olmo2")),
        "cooccurrence": run_config_hash(paper.cooccurrence),
        "hub_tensor": cache.code_version("hub_tensor"),
    }


def _producer_modules() -> set[str]:
    return {p.partition(":")[0] for producers in cache.PRODUCERS.values() for p in producers} | {
        type(f).__module__ for f in families.FAMILIES.values()
    }


def _comment_every_definition(text: str) -> str:
    text = re.sub(r"^(\s*)(def |class |@)", r"\1# a note a reader added\n\1\2", text, flags=re.M)
    return text + "\n# the end of the module\n"


class _Reworded(ast.NodeTransformer):
    """Every docstring and every log message reworded; every annotation replaced."""

    def _reword(self, node):
        self.generic_visit(node)
        body = getattr(node, "body", None)
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
            first.value.value, str
        ):
            first.value.value = "Reworded. " + first.value.value
        return node

    visit_Module = visit_FunctionDef = visit_ClassDef = _reword

    def visit_Call(self, node):
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) in ("log", "logger"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    arg.value = "reworded: " + arg.value
        return node

    def visit_arg(self, node):
        node.annotation = ast.Name("object") if node.annotation is not None else None
        return node


def _reworded(text: str) -> str:
    return ast.unparse(_Reworded().visit(ast.parse(text)))


def _unparsed(text: str) -> str:
    """The module as `ast.unparse` writes it: other quotes, line breaks, parentheses; no comments."""
    return ast.unparse(ast.parse(text))


def _ruff_formatted(text: str) -> str:
    """The module reformatted by ruff at another line length (a person's reformat)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "format", "--line-length", "72", "--stdin-filename", "x.py", "-"],
                          input=text, capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


@pytest.mark.parametrize(
    "edit", [_comment_every_definition, _reworded, _unparsed, _ruff_formatted],
    ids=["comments", "docstrings-logs-annotations", "ast-unparse", "ruff-format"],
)  # fmt: skip
def test_edits_of_the_text_keep_every_key(configs, edited, edit):
    before = _keys(configs)
    edited(dict.fromkeys(_producer_modules(), edit))
    tiny_module = importlib.import_module("garden.tiny")
    assert codehash.module_source("garden.tiny") != inspect.getsource(tiny_module)  # the text did change
    assert _keys(configs) == before


def _move(name: str, source_module: str, target_module: str) -> dict[str, Edit]:
    """Edits that cut a top-level definition out of one module and paste it at the end of another."""
    node = codehash.top_level_definitions(source_module)[name]
    original = codehash.module_source(source_module)
    lines = original.splitlines(keepends=True)
    start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 1
    segment = "".join(lines[start : node.end_lineno])
    return {
        source_module: lambda text: text.replace(segment, ""),
        target_module: lambda text: text + "\n\n" + segment,
    }


def test_a_move_between_producing_modules_keeps_every_key(configs, edited):
    before = _keys(configs)
    edited(_move("two_means_cuts", "garden.dip", "garden.dip_kernels"))
    assert "two_means_cuts" not in codehash.top_level_definitions("garden.dip")
    assert "two_means_cuts" in codehash.top_level_definitions("garden.dip_kernels")
    assert _keys(configs) == before


def test_a_refactor_of_a_loop_that_only_drives_keeps_every_key(configs, edited):
    """The evaluation's step loop reads back, scores and saves; how it does that is not in the keys."""
    before = _keys(configs)

    def refactor(text: str) -> str:
        changed = text.replace("records: dict[int, dict] = {}", "records: dict[int, dict] = dict()")
        changed = changed.replace("records[step] = found\n            continue",
                                  "records.update({step: found})\n            continue")  # fmt: skip
        assert changed.count("dict()") == 1 and "records.update" in changed
        return changed

    edited({"garden.evaluation.stage": refactor})
    assert _keys(configs) == before


def test_a_refactor_of_the_extraction_step_loop_keeps_every_key(configs, edited):
    """garden.extract.stream walks the steps (reuse, compute, exclude, prefetch) and decides no number."""
    assert not any(p.startswith("garden.extract.stream") for p in cache.PRODUCERS["extract"])
    before = _keys(configs)

    def refactor(text: str) -> str:
        old = "planned, reusable = _planned_reads(series, plan, folder, ref_fp)"
        assert old in text
        return text.replace(old, "reads_planned = _planned_reads(series, plan, folder, ref_fp)\n"
                                 "    planned, reusable = reads_planned[0], reads_planned[1]")  # fmt: skip

    edited({"garden.extract.stream": refactor})
    assert _keys(configs) == before


COMPUTATION_EDITS = [
    # (module, old text, new text, the keys that must change)
    ("garden.dip_kernels", "best = 1.0", "best = 2.0", {"extract"}),  # a kernel constant
    ("garden.extract.kernel", "frac = (rank - before + 0.5)", "frac = (rank - before + 0.25)", {"extract"}),
    ("garden.extract.records", '"trajectories"', '"trajectory"', {"extract"}),  # a record's field
    ("garden.tiny", "0.5 * (1.0 + math.cos", "0.4 * (1.0 + math.cos", {"tiny"}),  # the learning rule
    ("garden.tiny", "eps=1e-8", "eps=1e-6", {"tiny"}),  # the optimizer
    ("garden.evaluation.perplexity", 'reduction="sum"', 'reduction="mean"',  # a scorer
     {"evaluate", "evaluate gpt_neox", "evaluate olmo2"}),
    ("garden.evaluation.stability", "p = s / total", "p = s / total**2",  # the rank metric
     {"evaluate", "evaluate gpt_neox", "evaluate olmo2"}),
    ("garden.families.olmo2", "def value_weight(self, block, config)",  # one family
     "def value_weight(self, block, config, scale=1)", {"evaluate olmo2"}),
    ("garden.cooccurrence", "softplus(-margins)", "softplus(-2 * margins)", {"cooccurrence"}),
]  # fmt: skip


@pytest.mark.parametrize("module, old, new, moved", COMPUTATION_EDITS,
                         ids=[f"{m}:{n}" for m, _, n, _ in COMPUTATION_EDITS])  # fmt: skip
def test_an_edit_of_the_computation_moves_only_its_own_keys(configs, edited, module, old, new, moved):
    before = _keys(configs)
    assert old in codehash.module_source(module)
    edited({module: lambda text: text.replace(old, new)})
    after = _keys(configs)
    assert {k for k in before if before[k] != after[k]} == moved


def test_a_new_family_moves_no_key(configs, edited):
    """A family added to garden.families (a new module registered there) retires no record."""
    before = _keys(configs)
    edited({"garden.families": lambda text: text + "\n\nclass Gemma(Family):\n    name = 'gemma'\n"})
    assert _keys(configs) == before


# --------------------------------------------------------------------- the producer lists are complete


def _listed(kind: str) -> tuple[set[str], set[str]]:
    producers = cache.PRODUCERS[kind]
    return {p for p in producers if ":" not in p}, {p for p in producers if ":" in p}


def _is_covered(module: str, qualname: str, kind: str) -> bool:
    whole, named = _listed(kind)
    if module in whole or module in cache.NOT_PRODUCERS or not module.startswith("garden"):
        return True
    head = qualname.split(".")[0]
    return bool({f"{module}:{qualname}", f"{module}:{head}"} & (named | set(cache.NOT_PRODUCERS)))


def _callees(module_name: str, node: ast.AST) -> set[tuple[str, str]]:
    """(module, qualname) of the garden definitions a definition refers to by name."""
    module = importlib.import_module(module_name)
    own = codehash.top_level_definitions(module_name)
    found: set[tuple[str, str]] = set()
    for child in ast.walk(codehash.stripped(node)):  # annotations name types, they compute nothing
        target = None
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            target = vars(module).get(child.id)
            if child.id in own and not (inspect.isclass(target) and issubclass(target, BaseException)):
                found.add((module_name, child.id))
                continue
        elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
            base = vars(module).get(child.value.id)
            target = getattr(base, child.attr, None) if inspect.ismodule(base) else None
        if inspect.isclass(target) and issubclass(target, BaseException):
            continue  # an error raised shapes no record
        if inspect.isfunction(target) or inspect.isclass(target):
            found.add((target.__module__, target.__qualname__))
    return found


@pytest.mark.parametrize("kind", list(cache.PRODUCERS))
def test_every_garden_function_a_producer_calls_is_a_producer(kind):
    """Otherwise an edit of that function would change records without changing their keys."""
    uncovered = set()
    for producer in cache.PRODUCERS[kind]:
        module_name, _, qualname = producer.partition(":")
        definitions = codehash.top_level_definitions(module_name)
        nodes = [codehash.definition_node(module_name, qualname)] if qualname else list(definitions.values())
        for node in nodes:
            uncovered |= {f"{m}:{q}" for m, q in _callees(module_name, node) if not _is_covered(m, q, kind)}
    assert not uncovered, f"cache {kind!r}: add to cache.PRODUCERS or NOT_PRODUCERS: {sorted(uncovered)}"


def test_every_producer_names_a_definition_and_versions_are_tagged():
    for kind in cache.PRODUCERS:
        assert len(cache.code_version(kind)) == 12
    assert set(cache.version_tags("extract", "tiny")) == {"garden.cache.extract", "garden.cache.tiny"}
    with pytest.raises(LookupError, match="defines no 'nothing_here'"):
        codehash.definitions("garden.tiny:nothing_here")
