"""The memory plan of the paper's scale: mT5-base (batch 1024 = 8 microbatches of 128) and mT5-large (512 = 4
of 128) on 8 and 32 devices of 80 GB, the baseline and PRESENCE per microbatch, replicate against fsdp, in 1 to
16 accumulation chunks per microbatch (common/memory.py's estimate, as `pretrain.py --plan-memory` prints it).
Nothing is built or downloaded.

    python 03_pretrain/plan_memory_table.py        # writes results/paper/pretrain/memory_plan.csv, prints the table
"""
from __future__ import annotations

from common.cli import exit_on_known_errors
from common.config import ConfigError, load_preset
from common.io import write_csv
from common.memory import GB, HEADROOM, PLAN_PARTS, check_process_count, estimate_peak
from common.paths import results_dir
from common.presence.methods import BASELINE, PRESENCE

DEVICE_GB = 80
DEVICES = (8, 32)
CHUNKS = (1, 4, 16)
# The paper's two models at their batch (Table 3: base 1024 in 8 microbatches, large 512 in 4).
MODELS = {"mt5-base": [], "mt5-large": ["model.hub_config=google/mt5-large", "pretrain.batch_size=512",
                                        "pretrain.num_microbatches=4"]}
COLUMNS = ["model", "method", "devices", "strategy", "microbatch_chunks", *[f"{p}_gb" for p in PLAN_PARTS],
           "total_gb", "device_gb", "fits", "note"]


def plan_row(model: str, method: str, devices: int, strategy: str, chunks: int) -> dict:
    """One plan: GB per device of each part, and whether it fits HEADROOM of the device (or why it cannot run)."""
    row = {"model": model, "method": method, "devices": devices, "strategy": strategy, "microbatch_chunks": chunks,
           "device_gb": DEVICE_GB}
    preset = load_preset("paper", MODELS[model] + [f"distributed.strategy={strategy}",
                                                   f"pretrain.microbatch_chunks={chunks}"])
    try:
        check_process_count(preset, devices)
    except ConfigError as error:
        return {**row, "fits": False, "note": str(error).split(". Fix:")[0]}
    estimate = estimate_peak(preset, method, "microbatch", devices, gpu=True)
    parts = {f"{part}_gb": round(getattr(estimate, part) / GB, 2) for part in PLAN_PARTS}
    return {**row, **parts, "total_gb": round(estimate.total / GB, 2),
            "fits": estimate.total <= HEADROOM * DEVICE_GB * GB, "note": ""}


def markdown(rows: list[dict]) -> str:
    """PRESENCE's plans as the README shows them: total GB per device, one column per chunk count (✗: beyond
    HEADROOM of the device; –: the strategy cannot share the batch so, the CSV's note says why)."""
    lines = ["| model | devices | strategy | " + " | ".join(f"{c} chunk{'s' * (c > 1)}" for c in CHUNKS) + " |",
             "|---|---|---|" + "---|" * len(CHUNKS)]
    keys = sorted({(r["model"], r["devices"], r["strategy"]) for r in rows if r["method"] == PRESENCE.name},
                  key=lambda k: (k[0], k[1], k[2] != "replicate"))
    for model, devices, strategy in keys:
        cells = []
        for chunks in CHUNKS:
            r = next(r for r in rows if (r["model"], r["method"], r["devices"], r["strategy"],
                                         r["microbatch_chunks"]) == (model, PRESENCE.name, devices, strategy, chunks))
            cells.append("–" if r["note"] else f"{r['total_gb']:.1f}{'' if r['fits'] else ' ✗'}")
        lines.append(f"| {model} | {devices} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> list[dict]:
    rows = [plan_row(model, method, devices, strategy, chunks) for model in MODELS
            for method in (BASELINE.name, PRESENCE.name) for devices in DEVICES
            for strategy in ("replicate", "fsdp") for chunks in CHUNKS]
    path = results_dir("paper", "pretrain") / "memory_plan.csv"
    write_csv(path, rows, COLUMNS)
    print(markdown(rows))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    with exit_on_known_errors():
        main()
