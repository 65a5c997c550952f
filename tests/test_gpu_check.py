"""benchmarks/gpu_check.py, the prepared GPU check: its CPU dry run writes every section with numbers, and a section
that fails or runs past its time limit is recorded with its one-line error while the next one still runs."""
import json
import math
import time

import pytest
import torch

from benchmarks import gpu_check

SECTIONS = ["machine", "dit_training", "table4_chain", "tokenizer_training"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def a_timing(record: dict) -> bool:
    fastest, slowest = record["seconds_range"]
    return positive(record["first_step_seconds"]) and 0 < record["seconds_per_step"] == fastest <= slowest


def test_the_dry_run_writes_every_section_with_numbers(tmp_path, one_thread):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--dry-run", "--out", str(out)])
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == SECTIONS and report["dry_run"] is True
    assert all(section["status"] == "ok" and section["error"] is None and positive(section["seconds"])
               for section in sections.values())

    machine = sections["machine"]
    assert machine["device"] == "cpu" and positive(machine["limit"]["matmul"]["flops_per_second"])

    dit = sections["dit_training"]
    assert [(v["activation_checkpointing"], v["compile"]) for v in dit["variants"]] == list(gpu_check.DIT_VARIANTS)
    assert positive(dit["model_flops_per_step"])
    for variant in dit["variants"]:
        assert variant["error"] is None and a_timing(variant)
        assert all(positive(variant[key]) for key in ("images_per_second", "model_flops_per_second", "mfu"))
        assert variant["peak_allocated_gib"] is None  # the CPU keeps no peak-memory count

    chain = sections["table4_chain"]
    assert len(chain["rows"]) == 21  # f8, f16, f32 × (SD-VAE at NFE 1, ε-VAE (M) and (H) at NFE 1-3)
    assert all(positive(row["images_per_1000s"]) for row in chain["rows"])
    assert [(claim["claim"], claim["nfe"]) for claim in chain["ratios"]][:2] == [("ε-VAE (M) f16 / SD-VAE f8", 1),
                                                                                ("ε-VAE (M) f16 / SD-VAE f8", 2)]
    assert all(positive(claim["ours"]) and positive(claim["paper"]) for claim in chain["ratios"])

    (batch,) = sections["tokenizer_training"]["batches"]
    assert batch["error"] is None and a_timing(batch) and batch["phases"] == ["generator", "discriminator"]
    assert {"hydra-core", "omegaconf", "einops", "torch"} <= set(report["packages"])


def test_a_failed_or_late_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.SECTION_SECONDS, "table4_chain", 0.5)
    out, report, cpu = tmp_path / "gpu_check.json", {"sections": {}}, torch.device("cpu")

    def fails(record):
        record["measured"] = 1.0
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved but unallocated ...")

    def runs_late(record):
        record["rows"] = [{"f": 8}]
        time.sleep(30)

    gpu_check.run_section("dit_training", fails, report, out, cpu)
    started = time.perf_counter()
    gpu_check.run_section("table4_chain", runs_late, report, out, cpu)
    assert time.perf_counter() - started < 5
    gpu_check.run_section("tokenizer_training", lambda record: record.update(measured=2.0), report, out, cpu)

    sections = json.loads(out.read_text())["sections"]
    assert sections["dit_training"] == pytest.approx({
        "status": "failed", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "limit_seconds": gpu_check.SECTION_SECONDS["dit_training"], "measured": 1.0,
        "seconds": sections["dit_training"]["seconds"]})
    late = sections["table4_chain"]
    assert late["status"] == "timed out" and "time limit of 0.5 s" in late["error"] and late["rows"] == [{"f": 8}]
    assert sections["tokenizer_training"]["status"] == "ok" and sections["tokenizer_training"]["measured"] == 2.0
