"""`examples/benchmark_training.py --against-lavis`: what runs without LAVIS (arguments, the skip, the statistics and
the report on synthetic times), and, marked slow, the quick comparison end to end when `.venv-lavis` exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import load_example

ROOT = Path(__file__).resolve().parents[1]
LAVIS_PYTHON = ROOT / ".venv-lavis" / "bin" / "python"


@pytest.fixture(scope="module")
def bench():
    return load_example("benchmark_training")


def test_arguments(bench) -> None:
    args = bench.parse_args(["--against-lavis"])
    assert args.config is None and args.batch_size == 8 and args.memory_steps == 2 and args.lavis_steps is None
    assert args.lavis_python == Path(".venv-lavis/bin/python")
    args = bench.parse_args(["--against-lavis", "--config", "paper", "--lavis-steps", "3", "--batch-size", "16"])
    assert args.config == ["paper"] and args.lavis_steps == 3 and args.batch_size == 16
    assert bench.parse_args(["--against-lavis", "--quick"]).batch_size == 4
    assert bench.parse_args([]).memory_steps == 4  # the (a)/(b)/(c) mode keeps its defaults
    for wrong in (
        ["--config", "mid"],  # needs --against-lavis
        ["--against-lavis", "--quick", "--config", "mid"],
        ["--against-lavis", "--config", "quick"],
        ["--against-lavis", "--vision-dtype", "bfloat16"],
        ["--against-lavis", "--batch-size", "1"],
        ["--against-lavis", "--lavis-steps", "0"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


def test_skips_with_a_message_without_lavis(bench, tmp_path, capsys) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    output = tmp_path / "out.json"
    assert bench.main(["--against-lavis", "--lavis-python", str(missing), "--output-json", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "LAVIS comparison skipped" in printed and str(missing) in printed and "setup_lavis.sh" in printed
    assert not output.exists()


def test_vocabulary_has_bert_shapes_and_one_id_per_word(bench) -> None:
    assert len(bench.vocabulary(None)) == 5 + len(bench.CAPTION_WORDS)
    tokenizer = bench.build_tokenizer(bench.BERT_VOCAB_SIZE)
    assert len(tokenizer) == 30523 and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    ids = tokenizer("w1 w399", add_special_tokens=False)["input_ids"]
    assert ids == [bench.vocabulary(None).index("w1"), bench.vocabulary(None).index("w399")]
    config = bench.comparison_config(bench.COMPARISONS["paper"], tokenizer)
    assert config.qformer_config.hidden_size == 768 and config.qformer_config.num_hidden_layers == 12
    assert config.qformer_config.vocab_size == 30523 and config.vision_config.hidden_size == 1408
    assert config.vision_config.num_patches + 1 == 257 and config.vision_config.post_layernorm_eps == 1e-5


def _record(bench, seconds: float, disturbed: bool = False):
    return bench.StepRecord(seconds=seconds, foreign_ticks=50 if disturbed else 0, disturbed=disturbed, losses={})


def _records(bench):
    L, O, C = bench.LAVIS, bench.OURS, bench.OURS_CACHED  # noqa: N806, E741
    rows = [
        (9.0, 9.0, 9.0, False),  # the first cycle: left out
        (1.0, 0.5, 0.25, False),
        (1.2, 0.6, 0.3, False),
        (5.0, 0.7, 0.35, True),  # LAVIS's step disturbed: out of L's median and of the paired cycles
        (1.1, 0.55, 0.275, False),
    ]
    return [
        {L: _record(bench, lavis, bad), O: _record(bench, ours), C: _record(bench, cached)}
        for lavis, ours, cached, bad in rows
    ]


def test_summary_leaves_out_first_and_disturbed_steps(bench) -> None:
    summary = bench.summarise_steps(_records(bench))
    assert summary.timed_steps == 4 and summary.paired_cycles == 3 and not summary.paired_all_used
    assert summary.kept_steps == {bench.LAVIS: 3, bench.OURS: 4, bench.OURS_CACHED: 4}
    assert summary.median_s[bench.LAVIS] == pytest.approx(1.1)
    assert summary.median_s[bench.OURS] == pytest.approx(0.575)
    assert summary.paired[bench.OURS] == pytest.approx((0.5, 0.5, 0.5))
    assert summary.paired[bench.OURS_CACHED] == pytest.approx((0.25, 0.25, 0.25))
    everything_disturbed = [
        {name: _record(bench, record.seconds, True) for name, record in row.items()} for row in _records(bench)
    ]
    fallback = bench.summarise_steps(everything_disturbed)
    assert all(fallback.all_steps_used.values()) and fallback.paired_all_used
    assert fallback.median_s[bench.LAVIS] == pytest.approx(1.15)


def test_foreign_cpu_flags_others_load(bench) -> None:
    monitor = bench.ForeignCpu([])
    if sys.platform.startswith("linux"):
        assert isinstance(monitor.ticks(), int)
    assert not monitor.disturbed(None, 1.0) and not monitor.disturbed(2, 0.1)
    assert monitor.disturbed(int(0.5 * monitor.ticks_per_s), 1.0)  # half a core for a whole second


def test_report_on_synthetic_times(bench) -> None:
    memory = {
        bench.LAVIS: bench.MemoryResult(400.0, 1000.0, "VmHWM of the LAVIS worker"),
        bench.OURS: bench.MemoryResult(300.0, 900.0, "ru_maxrss"),
        bench.OURS_CACHED: bench.MemoryResult(200.0, 900.0, "ru_maxrss"),
    }
    result = bench.ComparisonResult(
        comparison=bench.COMPARISONS["paper"],
        batch_size=8,
        summary=bench.summarise_steps(_records(bench)),
        caching_s_per_batch=0.4,
        loss_differences={"itc": 1e-7, "itm": 2e-7, "itg": 0.0},
        parameters={},
        memory=memory,
    )
    assert result.ratio(bench.OURS) == pytest.approx(0.575 / 1.1)
    assert result.memory_ratio(bench.OURS) == pytest.approx(0.75)
    assert result.targets() == {
        "(O) step <= 1/1.3 of (L)'s": True,
        "(O+cache) step < (O)'s": True,
        "(O) peak memory <= (L)'s": True,
    }
    report = bench.comparison_report(result)
    assert "### paper:" in report and "vocabulary 30523" in report and "batch 8" in report
    rows = {line.split(" | ")[0]: line.split(" | ") for line in report.splitlines() if line.startswith("| (")}
    lavis, ours = rows["| (L) LAVIS Blip2Qformer, pixels"], rows["| (O) ours, Blip2ForPretraining, pixels"]
    assert lavis[1:4] == ["1100", f"{8 / 1.1:.2f}", "1.00"] and lavis[5:] == ["400", "1.00 |"]
    assert ours[1:6] == ["575", f"{8 / 0.575:.2f}", "0.52", "0.50 (0.50-0.50)", "300"]
    assert "(L) 3/4, (O) 4/4, (O+cache) 4/4; paired cycles 3/4" in report
    assert "400 ms per batch of 8" in report and "itm 2.0e-07" in report and "NOT met" not in report
    json.dumps(bench.comparison_json(result))  # the --output-json record serialises
    without_memory = bench.ComparisonResult(**{**result.__dict__, "memory": None})
    assert "not measured" in bench.comparison_report(without_memory)
    assert "(O) peak memory <= (L)'s" not in without_memory.targets()


@pytest.mark.slow
@pytest.mark.skipif(not LAVIS_PYTHON.exists(), reason="no .venv-lavis (scripts/setup_lavis.sh makes it)")
def test_quick_comparison_against_lavis_end_to_end(bench, tmp_path) -> None:
    output = tmp_path / "lavis.json"
    assert bench.main(["--against-lavis", "--quick", "--output-json", str(output)]) == 0
    (comparison,) = json.loads(output.read_text())["comparisons"]
    assert comparison["config"] == "quick" and max(comparison["loss_differences"].values()) < 1e-4
    assert len(comparison["steps"]) == comparison["summary"]["timed_steps"] + 1
    assert set(comparison["memory"]) == {"L", "O", "O+cache"}
    assert all(step["L"]["losses"]["loss"] > 0 for step in comparison["steps"])
