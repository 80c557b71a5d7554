"""Run under `accelerate launch` by test_training: every rank trains, then writes the prefix it
ends with to OUT/rank<N>.npy, so the test can compare the ranks."""

import sys
from pathlib import Path

import numpy as np
from accelerate import PartialState

from prefixkit.exporter.backbones import load_backbone
from prefixkit.training.data import load_examples, tables
from prefixkit.training.trainer import TrainSettings, train

backbone_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
examples = [group[0] for group in tables(load_examples(data)).values()][:8]
result = train(
    load_backbone(backbone_dir), examples, examples[:2], out / "prefix.npz",
    TrainSettings(epochs=3, batch_size=2, lr=1e-2, save_every=2), progress=False,
)
rank = PartialState().process_index
np.save(out / f"rank{rank}.npy", np.concatenate([result.prefix.key.ravel(), result.prefix.value.ravel()]))
print(f"rank {rank}: {result.step} steps, processes {result.meta['settings']['processes']}")
