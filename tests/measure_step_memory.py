"""Two optimizer steps of random microbatches at a preset's shapes, one thread a process; prints the
peak resident set size beyond what the process held before building the model (getrusage against
/proc/self/statm), an independent measurement of common/memory.py's model-dependent terms. Under torchrun
with distributed.strategy=fsdp every rank shards the model with FSDP2 (gloo), runs its share of each
microbatch's rows and prints its own peak.

    python tests/measure_step_memory.py presence model.d_model=256 pretrain.microbatch_chunks=2
    torchrun --nproc_per_node 2 tests/measure_step_memory.py presence per=sample distributed.strategy=fsdp
"""
import json
import os
import resource
import sys

import torch
import torch.distributed as dist

from common.config import load_preset
from common.distributed import block_lists, rank_rows, shard_model
from common.families import get_family
from common.data.span_corruption import compute_input_and_target_lengths
from common.modeling import build_model
from common.optim import build_optimizer
from common.presence.presence_step import StepPlan
from common.presence.train_step import train_step

method = sys.argv[1]
per = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("per=")), "microbatch")
overrides = [a for a in sys.argv[2:] if not a.startswith("per=")]
torch.set_num_threads(1)
preset = load_preset("tiny", overrides)
sharded = preset.distributed.strategy == "fsdp"
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
cfg, V = preset.pretrain, preset.data.tokenizer.vocab_size
raw, tl = compute_input_and_target_lengths(preset.data.input_length, 0.15, 3.0)
rows = cfg.batch_size // cfg.num_microbatches
g = torch.Generator().manual_seed(0)
if preset.model.family == "t5":
    mbs = [{"input_ids": torch.randint(3, V, (rows, preset.data.input_length), generator=g),
            "attention_mask": torch.ones(rows, preset.data.input_length, dtype=torch.long),
            "labels": torch.randint(3, V, (rows, tl), generator=g)} for _ in range(cfg.num_microbatches)]
else:
    ids = [torch.randint(3, V, (rows, raw), generator=g) for _ in range(cfg.num_microbatches)]
    mbs = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
if sharded:  # every rank shares every microbatch
    mbs = [{k: v[rank_rows(rows)] for k, v in mb.items()} for mb in mbs]
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
torch.manual_seed(0)
model = build_model(preset.model, V, raw); model.train()
if sharded:
    shard_model(model, block_lists(get_family(preset.model.family).first_blocks), torch.device("cpu"))
if cfg.activation_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
opt, sched = build_optimizer(model, cfg)
plan = StepPlan(update="scores", tau=1.0, per=per) if method != "baseline" else StepPlan()
for _ in range(2):
    train_step(model, mbs, plan, opt, sched, chunks=cfg.microbatch_chunks)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# One write per line: under torchrun both ranks share one pipe, and a print can interleave with the other rank's.
os.write(sys.stdout.fileno(), (json.dumps({"measured": peak - before}) + "\n").encode())
if dist.is_initialized():
    dist.destroy_process_group()
