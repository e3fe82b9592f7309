"""`vitp pretrain ARGS...` with train_testing.RecordingTrainer; each rank saves its record to
$VITP_RECORD_DIR/rank<RANK>.pt. test_loss_normalization runs it under torchrun."""

import os
import sys
from pathlib import Path

import torch

from train_testing import RecordingTrainer, recording_trainer
from vitp.cli import main

if __name__ == "__main__":
    recording_trainer()
    code = main(["pretrain", *sys.argv[1:]])
    if code == 0:
        rank = os.environ.get("RANK", "0")
        torch.save(RecordingTrainer.latest.record, Path(os.environ["VITP_RECORD_DIR"]) / f"rank{rank}.pt")
    sys.exit(code)
