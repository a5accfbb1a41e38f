"""benchmarks/pareto.py's comparison with the best uniform scheme of equal or smaller size."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("pareto", Path(__file__).parents[1] / "benchmarks" / "pareto.py")
pareto = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pareto)

ORIGINAL = {"wiki_original": {"perplexity": 10.0}, "c4_original": {"perplexity": 20.0}}


def ampq_row(budget, bits, wiki, c4):
    return {"model": "m", "budget": budget, "bits_per_weight": bits, "eval_windows": 4, "wiki": {"perplexity": wiki, "kl": 0.01},
            "c4": {"perplexity": c4}, **ORIGINAL}


def uniform(name, bits, wiki, c4):
    return {"name": name, "bits_per_weight": bits, "wiki": {"perplexity": wiki, "kl": 0.02}, "c4": {"perplexity": c4}}


def test_best_uniform_is_the_lowest_perplexity_no_larger():
    others = [uniform("a", 4.0, 14.0, 30.0), uniform("b", 4.5, 11.0, 21.0), uniform("c", 4.25, 12.0, 24.0),
              uniform("tiny", 2.0, 1e4, 1e4)]
    rows = pareto.against_best_uniform("m", [ampq_row(4.25, 4.25, 11.0, 22.0), ampq_row(1.5, 1.5, 50.0, 60.0),
                                             ampq_row(5.0, 4.6, 10.0, 20.0)], others)
    by_budget = {r[1]: r for r in rows}
    # "b" is better but larger than 4.25 bits: not a fair comparison, so "c" is the one
    assert by_budget[4.25][4] == "c" and by_budget[4.25][7] == "0.50 / 0.50" and by_budget[4.25][9] == "yes"
    assert by_budget[1.5][4] == "none this small"
    assert by_budget[5.0][4] == "b" and by_budget[5.0][7] == "0.00 / 0.00"


def test_worse_than_a_uniform_scheme_says_so():
    rows = pareto.against_best_uniform("m", [ampq_row(4.0, 4.0, 13.0, 21.0)], [uniform("u", 3.9, 12.0, 25.0)])
    assert rows[0][7] == "1.50 / 0.20" and rows[0][8] == "0.0100 / 0.0200" and rows[0][9] == "no"
    lossless = pareto.against_best_uniform("m", [ampq_row(5.0, 5.0, 10.0, 20.0)], [uniform("u", 5.0, 10.0, 20.0)])
    assert lossless[0][7] == "both lossless / both lossless" and lossless[0][9] == "yes"


def test_uniform_rows_are_read_from_the_benchmarks_result_folders():
    rows = pareto.uniform_rows("smollm2-135m", 16)
    assert {"ampq rtn int4-g128", "llm-compressor llmc-gptq int4-g64"} <= {r["name"] for r in rows}
