"""Two optimizer steps of random microbatches at a preset's shapes, one thread a process; prints the
peak resident set size beyond what the process held before building the model (getrusage against
/proc/self/statm), an independent measurement of common/memory.py's model-dependent terms. Under torchrun
with distributed.strategy=fsdp every rank shards the model with FSDP2 (gloo), runs its share of each
microbatch's rows and prints its own peak.

With `peak=tensors` it prints instead the peak of the bytes that live tensors hold, as PyTorch's CPU
allocator counts them under the profiler: the quantity the estimate models, without what a resident set
also holds and what differs between machines (the code pages of the kernels a CPU dispatches to, which are
faulted in by the first steps, and the C allocator's slack).

    python tests/measure_step_memory.py presence model.d_model=256 pretrain.microbatch_chunks=2
    python tests/measure_step_memory.py baseline peak=tensors model.d_model=256
    torchrun --nproc_per_node 2 tests/measure_step_memory.py presence per=sample distributed.strategy=fsdp
"""
import contextlib
import json
import os
import resource
import sys
import tempfile

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
tensors_only = "peak=tensors" in sys.argv[2:]
overrides = [a for a in sys.argv[2:] if not a.startswith(("per=", "peak="))]
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


def peak_tensor_bytes(profiler) -> int:
    """The largest count of bytes held by tensors allocated while `profiler` ran: the CPU allocator reports its
    running total with each allocation and free it makes under a memory-profiling profiler."""
    with tempfile.TemporaryDirectory() as scratch:
        trace = os.path.join(scratch, "trace.json")
        profiler.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            if tensors_only else contextlib.nullcontext())
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with profiler:
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
measured = (peak_tensor_bytes(profiler) if tensors_only
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
# One write per line: under torchrun both ranks share one pipe, and a print can interleave with the other rank's.
os.write(sys.stdout.fileno(), (json.dumps({"measured": measured}) + "\n").encode())
if dist.is_initialized():
    # Every rank waits for the others before tearing down: a rank that closes its sockets while its peer still
    # reads the last message of a collective makes gloo's reader throw, and the peer aborts.
    dist.barrier()
    dist.destroy_process_group()
