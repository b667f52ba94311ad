"""Run by tests/test_distributed.py under torchrun: a tiny CTMQ run; every rank
saves its weights after each stage it trains as <out>/rank<r>.safetensors."""
import os
import sys

from safetensors.torch import save_file

from ctmq.engine import RunConfig, run


class SaveEachRank:
    def __init__(self, out):
        self.path = os.path.join(out, f"rank{os.environ['RANK']}.safetensors")

    def stage_end(self, sched, index, model, metrics):
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, self.path)


if __name__ == "__main__":
    out, sync_bn = sys.argv[1], sys.argv[2] == "1"
    cfg = RunConfig(dataset="digits", width=0.125, start_bits=2, target_bits=1, cycles=1,
                    epochs_per_stage=1, batch_size=128, progress=False, out=out, device="cpu",
                    sync_bn=sync_bn, schedule="ctmq")
    run(cfg, callback=SaveEachRank(out))
