"""The run report is built from a tiny synthetic run directory, and from incomplete ones."""

import json

import pytest
import yaml

from moe.report import build as report

LAYERS = ["encoder/layer_1/moe", "decoder/layer_1/moe"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tasks=(("en-de", "translate"), ("wiki", "lm")), every=2):
    return {
        "name": "tiny",
        "tasks": [{"name": n, "kind": k, "source": "x"} for n, k in tasks],
        "moe": {"num_experts": 4, "every": every},
        "pod": {"topology": "tpu-v3", "slice": "2x2", "processes": 1},
    }


def _train_line(step, tasks, moe=True):
    line = {
        "kind": "train",
        "step": step,
        "time": 0.1 * step,
        "loss": 5.0 - 0.1 * step,
        "lr": 1e-3,
        "tokens_per_second": 1000.0 + step,
        "step_time_ms": 50.0 - step,
        "tasks": {t: {"loss": 5.0 - 0.2 * step + i, "tokens": 64} for i, t in enumerate(tasks)},
    }
    if moe:
        line["moe"] = {
            layer: {
                "aux_loss": 1.1,
                "z_loss": 0.5,
                "dropped_fraction": 0.1 / step,
                "load_cv": 0.4 / step,
                "expert_load": [0.4, 0.3, 0.2, 0.1],
            }
            for layer in LAYERS
        }
    return line


def _eval_line(step, ppl, tasks, split="valid"):
    return {
        "kind": "eval",
        "step": step,
        "split": split,
        "tasks": {t: {"loss": 1.0, "perplexity": ppl + i} for i, t in enumerate(tasks)},
    }


def _write_run(path, *, tasks=("en-de", "wiki"), kinds=("translate", "lm"), moe=True, full=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(_config(zip(tasks, kinds), 2 if moe else 0)))
    lines = [_train_line(s, tasks, moe) for s in (1, 2, 3, 4)]
    lines[2:2] = [_eval_line(2, 90.0, tasks)]
    lines.append(_eval_line(4, 30.0, tasks, "test"))
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if not full:
        return path
    (path / "eval").mkdir()
    summary = {"step": 4, "split": "test", "tasks": {}, "expert_usage": {}}
    for name, kind in zip(tasks, kinds):
        summary["tasks"][name] = {"kind": kind, "perplexity": 25.0, "examples_seen": 10}
        if kind == "translate":
            summary["tasks"][name].update(
                bleu=12.5,
                bleu_signature="nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                chrf=40.25,
                chrf_signature="nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0",
                decoded=5,
                sample_seed=0,
                split_size=5,
                empty_fraction=0.0,
                looping_fraction=0.0,
                hypotheses=f"eval/{name}.hyp.txt",
                references=f"eval/{name}.ref.txt",
                examples=[
                    {"source": "Hallo | Welt", "reference": "hello world", "hypothesis": "hi"}
                ],
            )
    if moe:
        summary["expert_usage"] = {
            layer: {t: [0.25 + 0.05 * i, 0.25, 0.25, 0.25 - 0.05 * i] for i, t in enumerate(tasks)}
            for layer in LAYERS
        }
    (path / "eval" / "summary.json").write_text(json.dumps(summary))
    train_summary = {
        "steps": 4,
        "wall_time_s": 12.0,
        "tokens_per_second": 1003.0,
        "step_time_ms": 47.5,
        "skipped_steps": 0,
        "examples_per_step": 2.5,
        "padding_fraction": 0.07,
        "model_flops_per_step": 1.2e10,
        "flop_utilisation": 0.31,
        "load_average": 1.5,
        "timing": {"data_s": 3.0, "compile_s": 2.0, "train_s": 6.0, "final_eval_s": 1.0},
        "examples_seen": {t: 100 + i for i, t in enumerate(tasks)},
        "pod": {
            "slice": "2x2",
            "devices": 4,
            "processes": 1,
            "measured_step_ms": 47.5,
            "projected_cpu_step_ms": 19.0,
            "target": "tpu-v3:2x2",
            "projected_step_ms": 0.5,
            "projected_breakdown": {"compute_ms": 0.3, "all_to_all_ms": 0.2},
        },
        "data": {
            t: {"train": 90, "valid": 5, "test": 5, "malformed": 1, "duplicates": 2} for t in tasks
        },
    }
    (path / "train_summary.json").write_text(json.dumps(train_summary))
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_full_run_report_has_the_design_keys_and_final_numbers(tmp_path):
    run = _write_run(tmp_path / "run")
    result = report.build(run).model_dump(mode="json")
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk == result
    assert {"tasks", "train", "experts", "pod"} <= set(result)
    de = result["tasks"]["en-de"]
    assert set(de) >= {"kind", "perplexity", "bleu", "bleu_signature", "hypotheses", "references"}
    assert (de["kind"], de["perplexity"], de["first_perplexity"], de["bleu"]) == (
        "translate",
        25.0,
        90.0,
        12.5,
    )
    assert de["examples_seen"] == 100
    assert result["tasks"]["wiki"]["bleu"] is None
    assert result["train"]["steps"] == 4 and result["train"]["tokens_per_second"] == 1003.0
    assert result["experts"]["has_moe"] and list(result["experts"]["layers"]) == LAYERS
    assert result["experts"]["layers"][LAYERS[0]]["final_dropped_fraction"] == pytest.approx(0.025)
    assert result["pod"]["measured_over_projected"] == pytest.approx(2.5)  # CPU vs CPU
    assert result["problems"] == []


def test_full_run_writes_all_plots(tmp_path):
    run = _write_run(tmp_path / "run")
    result = report.build(run).model_dump(mode="json")
    assert set(result["plots"]) == {"loss", "expert_usage", "routing", "throughput", "validation"}
    for name in result["plots"].values():
        _assert_png(run / name)


def test_markdown_has_the_per_task_table_pod_and_examples(tmp_path):
    run = _write_run(tmp_path / "run")
    report.build(run)
    md = (run / "report.md").read_text()
    assert md.startswith("# Run report: tiny")
    header = "| task | kind | perplexity (valid, step 2) | perplexity (test, final, step 4) |"
    assert header + " BLEU | chrF | examples seen |" in md
    assert "| `en-de` | translate | 90.00 | 25.00 | 12.50 | 40.25 | 100 |" in md
    assert "| `wiki` | lm | 91.00 | 25.00 | – | – | 101 |" in md
    assert "tok:13a" in md and "chrF signature: `nrefs:1" in md
    assert "random sample of 5 of the 5 test sentences (seed 0)" in md
    assert "![Training loss per task](loss.png)" in md
    assert "![Validation perplexity per task](validation.png)" in md
    assert "expert_usage.png" in md and "routing.png" in md and "throughput.png" in md
    assert "| projected step time on this CPU host (ms) | 19.0 |" in md
    assert "| cost model accuracy here (measured / projected) | 2.50 |" in md
    assert "Projected step time on the real slice (tpu-v3:2x2): 0.500 ms" in md
    assert "Warning" not in md
    assert "| padding (share of positions) | 0.070 |" in md and "| FLOP utilisation" in md
    assert "Where the time went (s): data 3.0, compile 2.0, train 6.0, final_eval 1.0" in md
    assert "| all_to_all_ms | 0.200 |" in md
    assert "Hallo \\| Welt" in md  # pipes in decoded text cannot break the markdown
    assert "n/a" not in md.split("## Decoded examples")[0].split("## Pod")[0]


def test_only_config_and_metrics_says_na_and_does_not_crash(tmp_path):
    run = _write_run(tmp_path / "run", full=False)
    result = report.build(run).model_dump(mode="json")
    md = (run / "report.md").read_text()
    de = result["tasks"]["en-de"]
    assert (de["perplexity"], de["first_perplexity"], de["bleu"]) == (30.0, 90.0, None)
    assert de["examples_seen"] is None and de["bleu_signature"] is None
    assert result["pod"]["measured_step_ms"] is None
    assert "| `en-de` | translate | 90.00 | 30.00 | n/a | n/a | n/a |" in md
    assert "eval/summary.json: missing" in md and "train_summary.json: missing" in md
    assert "| measured step time on this CPU host (ms) | n/a |" in md
    assert "Data counts: n/a" in md
    assert "for 4 steps in n/a s" in md
    # With no per-task usage, the heatmap falls back to the last training step's load.
    assert result["experts"]["usage_source"].startswith("last training step")
    for name in result["plots"].values():
        _assert_png(run / name)


def test_dense_model_report_says_there_are_no_moe_layers(tmp_path):
    run = _write_run(tmp_path / "run", moe=False)
    result = report.build(run).model_dump(mode="json")
    md = (run / "report.md").read_text()
    assert result["experts"]["has_moe"] is False and result["experts"]["layers"] == {}
    assert "no MoE layers" in md
    assert set(result["plots"]) == {"loss", "throughput", "validation"}
    assert not (run / "expert_usage.png").exists() and not (run / "routing.png").exists()


def test_lm_only_run_prints_a_dash_for_bleu(tmp_path):
    run = _write_run(tmp_path / "run", tasks=("wiki", "code"), kinds=("lm", "lm"))
    result = report.build(run).model_dump(mode="json")
    md = (run / "report.md").read_text()
    assert all(t["bleu"] is None for t in result["tasks"].values())
    rows = [line for line in md.splitlines() if line.startswith(("| `wiki` | lm", "| `code` | lm"))]
    assert len(rows) == 2 and all(row.split(" | ")[4] == "–" for row in rows)
    assert "BLEU signature" not in md


def test_malformed_lines_and_non_finite_numbers_are_tolerated(tmp_path):
    run = _write_run(tmp_path / "run", full=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 5, "loss": NaN, "tokens_per_second": Infinity}\n')
        f.write('{"kind": "train", "step": 6, "lo')  # cut short by an interrupted run
    result = report.build(run).model_dump(mode="json")
    text = (run / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert result["train"]["final_loss"] is None
    assert "1 malformed line(s) skipped" in " ".join(result["problems"])


def test_empty_directory_still_gets_a_report(tmp_path):
    result = report.build(tmp_path).model_dump(mode="json")
    md = (tmp_path / "report.md").read_text()
    assert result["tasks"] == {} and result["plots"] == {}
    assert "config.yaml: missing" in md and "metrics.jsonl: missing" in md


def test_router_bias_and_device_fanout_reach_the_report(tmp_path):
    run = _write_run(tmp_path / "run")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for i, stats in enumerate(line.get("moe", {}).values()):
            stats["device_fanout"] = 1.5 + i
            stats["router_bias"] = [0.001 * line["step"], -0.002, 0.0, 0.001 * i]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    built = report.build(run)
    assert built.experts.router_bias == {
        LAYERS[0]: [0.004, -0.002, 0.0, 0.0],
        LAYERS[1]: [0.004, -0.002, 0.0, 0.001],
    }
    assert built.experts.layers[LAYERS[1]].final_device_fanout == 2.5
    md = (run / "report.md").read_text()
    assert "device fan-out" in md and "Router bias (loss-free balancing), final:" in md
    assert "| `decoder/layer_1/moe` | -0.0020 | 0.0040 | 0.004 -0.002 0.000 0.001 |" in md
    plain = report.build(_write_run(tmp_path / "plain"))
    assert (
        plain.experts.router_bias == {}
        and "Router bias" not in (tmp_path / "plain" / "report.md").read_text()
    )


def test_a_valid_split_evaluation_is_labelled_valid_never_final(tmp_path):
    """`moe eval --split valid` rewrites eval/summary.json for the valid split: the report says
    which split and step its numbers are, and does not call them final."""
    run = _write_run(tmp_path / "run")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary.update(split="valid", step=3)
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    result = report.build(run)
    md = (run / "report.md").read_text()
    assert (result.final_split, result.final_step) == ("valid", 3)
    assert "| perplexity (valid, step 3) |" in md and "final" not in md.split("## Training")[0]


def test_degenerate_decodes_give_a_warning(tmp_path):
    run = _write_run(tmp_path / "run")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary["tasks"]["en-de"].update(empty_fraction=0.4, looping_fraction=0.25)
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    result = report.build(run)
    md = (run / "report.md").read_text()
    assert result.warnings == [
        "en-de: 40% of the decoded lines are empty and 25% loop (a word three times in a row); "
        "its BLEU means little (train longer?)"
    ]
    assert "**Warning**: en-de: 40% of the decoded lines are empty" in md
    assert "`en-de` 40% empty, 25% looping" in md
