"""LightningCLI entry point for the examples: any model and data module, any strategy, from YAML.

python examples/cli.py fit --config examples/vrl_sgd.yaml
python examples/cli.py fit --config examples/vrl_sgd.yaml --trainer.strategy.init_args.period 50

A configuration with ``num_nodes`` > 1 (examples/hierarchical_local_sgd.yaml) needs every node started, one
``torchrun --nnodes N --node-rank R ...`` per node: that file's comment has the commands for one machine.
"""

import torch
from lightning.pytorch.cli import LightningCLI

import lightning_localsgd  # noqa: F401 - registers the strategy names (`local_sgd`, `vrl_sgd`, ...)
from lightning_localsgd.demos.digits import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    torch.set_num_threads(1)
    LightningCLI(DigitsCNN, DigitsDataModule)
