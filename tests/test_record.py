"""What a run records in MLflow, as a reader meets it: the description's first line, no chart for a count
or an event not reached, and a cached rerun told apart from the run it reused."""

from __future__ import annotations

import math

import pytest

from garden.record import (
    CACHED_MARK,
    Reuse,
    description,
    fact_params,
    headline_sentence,
    summary_metrics,
)

REACHED_TAGS = {"garden.bifurcation": "none", "garden.unit_bifurcation": "detected",
                "garden.stationary": "detected"}  # fmt: skip


def test_counts_are_params_and_an_event_not_reached_is_nan_not_minus_one():
    summary = {"n_steps": 66.0, "n_units": 128.0, "n_parameters": 262144.0, "n_duplicate_steps": 0.0,
               "msd_regimes": 3.0, "hub_bytes_fetched": 1.5e9, "alpha": 1.7, "stationary_step": 640.0,
               "unit_bifurcation_step": 360.0}  # fmt: skip
    logged = summary_metrics(summary, REACHED_TAGS)
    assert set(logged) == {"summary/alpha", "summary/stationary_step", "summary/unit_bifurcation_step",
                           "summary/bifurcation_step"}  # fmt: skip
    assert math.isnan(logged["summary/bifurcation_step"])  # MLflow draws no bar for it, and no -1
    assert fact_params(summary) == {
        "run.n_steps": "66", "run.n_units": "128", "run.n_parameters": "262144", "run.n_duplicate_steps": "0",
        "run.msd_regimes": "3", "run.hub_bytes_fetched": "1500000000",
    }  # fmt: skip
    assert fact_params({"n_units": None, "n_steps": math.nan}) == {}  # undefined: no param at all


@pytest.mark.parametrize(
    ("summary", "tags", "expected"),
    [
        ({"unit_bifurcation_step": 360.0, "final_bimodal_unit_fraction": 0.65, "n_units": 128.0,
          "stationary_step": 640.0}, REACHED_TAGS,
         "The tensor does not fork as a whole; its units fork at step 360 (65% of 128 bimodal at the end); "
         "it becomes stationary at step 640."),
        ({"bifurcation_step": 80.0, "final_perplexity": 12.345},
         {"garden.bifurcation": "detected", "garden.stationary": "none", "garden.units": "off"},
         "The tensor forks as a whole at step 80; it does not become stationary; final perplexity 12.35."),
        ({}, {}, "No event was looked for (metrics without bifurcation or stationary)."),
    ],
)  # fmt: skip
def test_the_headline_sentence_says_the_result(summary, tags, expected):
    assert headline_sentence(summary, tags) == expected


def test_a_description_leads_with_its_result_then_its_key_figures(tmp_path):
    text = description("Units fork at step 360.", "tiny/standard/unembedding", "the dynamics of X",
                       [("stationary", "at step 640")], tmp_path, "cached rerun: nothing computed",
                       ("abc123", ["previews/unit_forks.png"]))  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "**Units fork at step 360.**"
    assert lines[2] == "![unit_forks](get-artifact?path=previews%2Funit_forks.png&run_uuid=abc123)"
    assert lines[4] == "tiny/standard/unembedding: the dynamics of X."
    assert "| stationary | at step 640 |" in lines and "cached rerun: nothing computed" in lines
    # No preview (figures=false): no image line.
    assert "get-artifact" not in description("x.", "n", "w", [("a", "b")], tmp_path)


def test_a_run_that_computed_nothing_is_a_cached_rerun():
    cached = Reuse({"extracted steps": (0, 66)}, trained=False)
    assert cached.state == "all"
    reused = "66 of 66 extracted steps, the series (trained before)"
    # No earlier run of the same job (a sweep's job whose records another job made): no mark.
    assert cached.name("a") == "a" and cached.line() == f"nothing computed; from garden's caches: {reused}"
    cached.reused_run = "f00"
    assert cached.line() == f"cached rerun of run f00: nothing computed; from garden's caches: {reused}"
    assert cached.tags() == {"garden.cached": "all", "garden.reuse": reused, "garden.reused_run": "f00"}
    assert cached.name("tiny/standard/unembedding") == "(cached) tiny/standard/unembedding"

    resumed = Reuse({"extracted steps": (20, 66), "evaluated steps": (0, 10)}, trained=None)
    assert resumed.state == "part" and resumed.name("n") == "n"
    assert resumed.line() == ("partly cached: from garden's caches: 46 of 66 extracted steps, 10 of 10 "
                              "evaluated steps; computed: 20 of 66 extracted steps")  # fmt: skip

    fresh = Reuse({"extracted steps": (66, 66)}, trained=True)
    assert fresh.state == "none" and fresh.tags() == {"garden.cached": "none", "garden.reuse": "nothing"}
    assert fresh.line() == ("nothing reused: computed 66 of 66 extracted steps, the series (trained in "
                            "this run)")  # fmt: skip
    assert CACHED_MARK.strip() == "(cached)"
