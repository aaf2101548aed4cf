"""LightningCLI entry point for the examples: any model and data module, any strategy, from YAML.

python examples/cli.py fit --config examples/vrl_sgd.yaml
python examples/cli.py fit --config examples/vrl_sgd.yaml --trainer.strategy.init_args.period 50
"""

import torch
from lightning.pytorch.cli import LightningCLI

import lightning_localsgd  # noqa: F401 - registers `local_sgd` and `vrl_sgd`
from lightning_localsgd.demos.digits import DigitsCNN, DigitsDataModule

if __name__ == "__main__":
    torch.set_num_threads(1)
    LightningCLI(DigitsCNN, DigitsDataModule)
