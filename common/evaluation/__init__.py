"""Downstream evaluation: XTREME readers (xtreme.py), the official metrics (metrics.py), fine-tuning
(finetuning.py; the task heads of the non-T5 families in heads.py, BERT's span extraction in
extractive_qa.py) and offline parallel-verse retrieval (retrieval.py)."""
