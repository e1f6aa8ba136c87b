"""Put results/<preset>/tables/headline.md (written by make_figures.py) into README.md, between the
lines <!-- results:begin --> and <!-- results:end -->, and the answer table (does self-influence carry
information beyond the loss; does any score beat the baseline?) made from the comparisons.csv of the
--answer-presets between <!-- answer:begin --> and <!-- answer:end -->. Everything outside the markers is kept.

    python 05_figures/update_readme.py --preset tiny
    python 05_figures/update_readme.py --preset small --readme README.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from common.cli import exit_on_known_errors
from common.config import load_preset, preset_argument
from common.io import atomic_open
from common.reporting.comparisons import answer_markdown
from common.reporting.markdown import replace_marked_block
from common.paths import REPO_ROOT, results_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="whose headline.md to insert: tiny | small | paper | a YAML path")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    # T5 at tiny, tiny_x10 and on mixed sources, then the other model families at their tiny presets, whichever
    # have been run
    p.add_argument("--answer-presets", nargs="+", default=["tiny", "presets/variants/tiny_x10.yaml",
                                                           "presets/variants/tiny_sources.yaml"] + [
        f"presets/variants/tiny_{family}.yaml" for family in ("gpt2", "llama", "bert")],
                   help="presets whose tables/comparisons.csv make the answer table")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    preset = load_preset(args.preset)
    headline = results_dir(preset.name, "tables") / "headline.md"
    if not headline.is_file():
        raise FileNotFoundError(f"{headline} is missing. Fix: run "
                                f"python 05_figures/make_figures.py --preset {preset_argument(args.preset)}")
    readme = Path(args.readme)
    text = replace_marked_block(readme.read_text(encoding="utf-8"), headline.read_text(encoding="utf-8"))
    tables = {}
    for name in args.answer_presets:
        path = results_dir(load_preset(name).name, "tables") / "comparisons.csv"
        if path.is_file():
            tables[load_preset(name).name] = pd.read_csv(path, keep_default_na=False, na_values=[""])
        else:
            print(f"note: {path} is missing, so the answer table leaves preset {name} out")
    if "<!-- answer:begin -->" in text:
        text = replace_marked_block(text, answer_markdown(tables), "<!-- answer:begin -->", "<!-- answer:end -->")
    with atomic_open(readme) as f:
        f.write(text)
    print(f"put {headline} into {readme}")
    return {"readme": str(readme), "headline": str(headline)}


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())
