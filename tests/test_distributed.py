"""Data parallel: 2 gloo processes on the CPU, each with half of the microbatches, must hold the same
update as one process with the whole batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.distributed import broadcast_parameters
from common.presence.presence_step import baseline_step, presence_step
from tiny_t5 import flat_grad, one_thread, split, tiny_batch, tiny_t5  # noqa: F401 (autouse fixture)

WORLD = 2
MICROBATCH = 2
STEPS = {
    "baseline": lambda model, mbs: baseline_step(model, mbs),
    "presence-microbatch": lambda model, mbs: presence_step(model, mbs, 1.5),
    "presence-sample": lambda model, mbs: presence_step(model, mbs, -1.0, per="sample"),
}


def run_steps(model, microbatches) -> dict:
    results = {}
    for name, step in STEPS.items():
        stats = step(model, microbatches)
        results[name] = (flat_grad(model).clone(), stats)
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = tiny_t5(seed=rank)  # different on purpose: broadcast_parameters must make them equal
        broadcast_parameters(model)
        microbatches = split(tiny_batch(), MICROBATCH)
        share = len(microbatches) // WORLD
        torch.save(run_steps(model, microbatches[rank * share:(rank + 1) * share]), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank closes its sockets while another still reads (gloo's reader would abort it)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    # fork where there is one: the children inherit the imported torch and transformers, which a spawned
    # child takes ~8 s to import. They set one thread before any parallel work, as DataLoader workers do.
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=start_method)
    expected = run_steps(tiny_t5(seed=0), split(tiny_batch(), MICROBATCH))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, (grad, stats) in expected.items():
            rank_grad, rank_stats = got[name]
            assert ((rank_grad - grad).norm() / grad.norm()).item() < 1e-12, (name, rank)
            assert rank_stats.loss == pytest.approx(stats.loss, rel=1e-12)
            if stats.scores is not None:
                assert torch.allclose(rank_stats.scores, stats.scores, rtol=1e-12, atol=0)
                assert torch.allclose(rank_stats.weights, stats.weights, rtol=1e-12, atol=0)
