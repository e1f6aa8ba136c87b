"""Run by tests/test_portable_checkpoint.py under another transformers release (PYTHONPATH puts it in front
of the pinned one): load a checkpoint folder with the Auto classes only, as a user of that release would,
and write what it computes as JSON.

    python tests/load_with_other_transformers.py CHECKPOINT_DIR INPUT_JSON OUTPUT_JSON
INPUT_JSON holds {"auto_class": "AutoModelForSeq2SeqLM" (or another Auto class of transformers), "texts":
[...], "labels": [[...], ...]} ("labels": decoder targets, for an encoder-decoder only).
"""
import json
import sys

import torch
import transformers
from transformers import AutoTokenizer

folder, inputs_path, output_path = sys.argv[1:]
inputs = json.loads(open(inputs_path, encoding="utf-8").read())
tokenizer = AutoTokenizer.from_pretrained(folder)
model = getattr(transformers, inputs["auto_class"]).from_pretrained(folder).eval()
batch = tokenizer(inputs["texts"], padding=True, return_tensors="pt")
if "labels" in inputs:
    batch["labels"] = torch.tensor(inputs["labels"])
with torch.no_grad():
    logits = model(**batch).logits
result = {"transformers": transformers.__version__, "model_class": type(model).__name__,
          "input_ids": batch.input_ids.tolist(),
          "decoded": tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True),
          "lm_head_tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
          "logits": logits.tolist()}
with open(output_path, "w", encoding="utf-8") as f:
    json.dump(result, f)
