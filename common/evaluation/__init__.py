"""Downstream evaluation: XTREME readers (xtreme.py), the official metrics (metrics.py), fine-tuning
(finetuning.py) and offline parallel-verse retrieval (retrieval.py)."""
