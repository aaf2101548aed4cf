"""Strategy names, constructor validation and LightningCLI configuration (no processes are started)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.strategies import StrategyRegistry

import lightning_localsgd
from lightning_localsgd import CoCoDSGDStrategy, LocalSGDStrategy, OverlapLocalSGDStrategy, VRLSGDStrategy
from lightning_localsgd.strategies import ALL_STRATEGIES

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    ("name", "cls", "period"),
    [
        ("local_sgd", LocalSGDStrategy, 16),
        ("vrl_sgd", VRLSGDStrategy, 20),
        ("overlap_local_sgd", OverlapLocalSGDStrategy, 2),
        ("cocod_sgd", CoCoDSGDStrategy, 2),
        ("liec_sgd", lightning_localsgd.LIECSGDStrategy, 32),
        ("ef_sign", lightning_localsgd.ErrorFeedbackStrategy, 100),
        ("dpsgd", lightning_localsgd.DPSGDStrategy, 50),
        ("detag", lightning_localsgd.DeTAGStrategy, 50),
        ("diloco", lightning_localsgd.DiLoCoStrategy, 100),
        ("stl_sgd", lightning_localsgd.STLSGDStrategy, 4),
        ("hierarchical_local_sgd", lightning_localsgd.HierarchicalLocalSGDStrategy, 4),
    ],
)
def test_registered_names_resolve_to_the_strategy_with_its_defaults(name, cls, period):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
    assert type(trainer.strategy) is cls
    assert trainer.strategy.algorithm.period == period
    assert trainer.strategy.world_size == 2


def test_registration_is_idempotent():
    importlib.reload(lightning_localsgd)
    VRLSGDStrategy.register_strategies(StrategyRegistry)
    assert StrategyRegistry["vrl_sgd"]["strategy"].__name__ == "VRLSGDStrategy"


COMMON_BAD_ARGUMENTS = [
    ({"period": 0}, "period"),
    ({"period": 2.5}, "period"),
    ({"period": True}, "period"),
    ({"period": "16"}, "period"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
    ({"bucket_cap_mb": float("nan")}, "bucket_cap_mb"),
    ({"log_comm_metrics": 1}, "log_comm_metrics"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"on_nonfinite": None}, "on_nonfinite"),
    ({"collective_timeout": 0}, "collective_timeout"),
    ({"collective_timeout": -5.0}, "collective_timeout"),
    ({"collective_timeout": float("inf")}, "collective_timeout"),
    ({"collective_timeout": "60"}, "collective_timeout"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "30 minutes"}, "timeout"),
]


def _spelled_for(cls, kwargs: dict, named: str) -> tuple[dict, str]:
    """LIEC-SGD calls its period `full_sync_period`, the gossip strategies `check_every`, STL-SGD `first_period`."""
    spelling = {
        "LIECSGDStrategy": "full_sync_period",
        "DPSGDStrategy": "check_every",
        "DeTAGStrategy": "check_every",
        "STLSGDStrategy": "first_period",
        "HierarchicalLocalSGDStrategy": "intra_period",
    }
    if cls.__name__ in spelling and "period" in kwargs:
        return {spelling[cls.__name__]: kwargs["period"]}, spelling[cls.__name__]
    return kwargs, named


BAD_ARGUMENTS = [
    *[(cls, *_spelled_for(cls, kwargs, named)) for cls in ALL_STRATEGIES for kwargs, named in COMMON_BAD_ARGUMENTS],
    *[(cls, {"first_period_one_step": "yes"}, "first_period_one_step") for cls in (LocalSGDStrategy, VRLSGDStrategy)],
    (OverlapLocalSGDStrategy, {"pullback": 1.2}, "pullback"),
    (OverlapLocalSGDStrategy, {"anchor_momentum": -0.5}, "anchor_momentum"),
    (OverlapLocalSGDStrategy, {"anchor_momentum": 1}, "anchor_momentum"),
    (lightning_localsgd.DPSGDStrategy, {"topology": "star"}, "topology"),
    (lightning_localsgd.DPSGDStrategy, {"gossip_order": "mixed"}, "gossip_order"),
    (lightning_localsgd.DPSGDStrategy, {"on_nonfinite": "skip_round"}, "on_nonfinite"),
    (lightning_localsgd.DeTAGStrategy, {"gossip_rounds": 0}, "gossip_rounds"),
    (lightning_localsgd.DeTAGStrategy, {"gossip_rounds": 65}, "gossip_rounds"),
    (lightning_localsgd.DeTAGStrategy, {"acceleration": 1.0}, "acceleration"),
    (lightning_localsgd.DeTAGStrategy, {"acceleration": "fast"}, "acceleration"),
    (lightning_localsgd.DiLoCoStrategy, {"outer_optimizer": "Lion"}, "outer_optimizer"),
    (lightning_localsgd.DiLoCoStrategy, {"outer_optimizer_options": {"lr": -1}}, "outer_optimizer_options"),
    (lightning_localsgd.DiLoCoStrategy, {"global_device": "gpu"}, "global_device"),
    (lightning_localsgd.DiLoCoStrategy, {"overlap": "yes"}, "overlap"),
    (lightning_localsgd.STLSGDStrategy, {"first_stage_steps": 0}, "first_stage_steps"),
    (lightning_localsgd.STLSGDStrategy, {"period_growth": "fast"}, "period_growth"),
    (lightning_localsgd.STLSGDStrategy, {"lr_decay": 2.0}, "lr_decay"),
    (lightning_localsgd.STLSGDStrategy, {"proximal": 0}, "proximal"),
    (lightning_localsgd.HierarchicalLocalSGDStrategy, {"inter_period": 6}, "inter_period"),
]


@pytest.mark.parametrize(("cls", "kwargs", "named"), BAD_ARGUMENTS)
def test_bad_arguments_raise_at_construction_naming_the_argument(cls, kwargs, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        cls(**kwargs)


def test_bad_arguments_raise_before_any_process_starts():
    # Trainer construction happens before the launcher starts rank 1: the error stops everything there.
    with pytest.raises(ValueError, match="`period`"):
        L.Trainer(accelerator="cpu", devices=2, strategy=VRLSGDStrategy(period=-3))


@pytest.mark.parametrize(
    "cls",
    [*ALL_STRATEGIES, *lightning_localsgd.fabric.ALL_FABRIC_STRATEGIES],
    ids=lambda cls: f"{cls.__module__.split('.')[1]}.{cls.__name__}",
)
def test_a_misspelt_keyword_names_the_class_called_and_the_closest_argument(cls):
    with pytest.raises(TypeError) as caught:
        cls(colective_timeout=60)
    message = str(caught.value)
    assert message.startswith(
        f"{cls.__name__}() got unexpected keyword argument `colective_timeout` (did you mean `collective_timeout`?)."
    )
    assert "LocalUpdateStrategy" not in message and "__init__" not in message


def test_the_keyword_error_lists_what_the_class_takes_and_suggests_only_close_names():
    with pytest.raises(TypeError) as caught:
        VRLSGDStrategy(perod=5, colour="red")
    message = str(caught.value)
    assert "`perod` (did you mean `period`?), `colour`." in message
    takes = message.split("It takes: ")[1].rstrip(".").split(", ")
    # VRLSGDStrategy's own arguments first, then those its **kwargs reach (the base's, Lightning's DDP ones)
    assert takes[:5] == ["period", "warmup_steps", "first_period_one_step", "bucket_cap_mb", "buffers"]
    assert {"on_nonfinite", "collective_timeout", "timeout", "process_group_backend", "start_method"} <= set(takes)
    assert "algorithm" not in takes and "self" not in takes  # the class builds its algorithm itself
    with pytest.raises(TypeError, match=r"^LocalUpdateStrategy\(\) got .*`algoritm` \(did you mean `algorithm`\?\)"):
        lightning_localsgd.LocalUpdateStrategy(lightning_localsgd.LocalSGD(4), algoritm=None)


def test_a_misspelt_keyword_in_a_cli_config_is_still_refused_by_the_parser(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_localsgd.VRLSGDStrategy\n    init_args:\n      perod: 7\n"
    )
    with pytest.raises(SystemExit):
        LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(config)])


def test_streaming_diloco_takes_its_fragments_and_compressor_from_yaml_and_fabric():
    config = ["--config", str(EXAMPLES / "streaming_diloco.yaml")]
    algorithm = LightningCLI(BoringModel, BoringDataModule, run=False, args=config).trainer.strategy.algorithm
    assert (algorithm.outer_period, algorithm.period, algorithm.fragments, algorithm.sync_delay) == (32, 16, 2, 2)
    assert algorithm.codec.compressor.name == "int4" and algorithm.codec.compressor.block_numel == 4096
    assert not algorithm.codec.error_feedback and not algorithm.rounds_synchronise
    args = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=lightning_localsgd.DiLoCoStrategy",
        "--trainer.strategy.period=12",
        "--trainer.strategy.fragments=3",
        "--trainer.strategy.merge_alpha=0.5",
        "--trainer.strategy.compressor=sparse_topk",
        "--trainer.strategy.compressor_options={k: 8, chunk_numel: 256}",
        "--trainer.strategy.error_decay=0.95",
    ]
    algorithm = LightningCLI(BoringModel, BoringDataModule, run=False, args=args).trainer.strategy.algorithm
    assert (algorithm.period, algorithm.merge_alpha, algorithm.codec.error_decay) == (4, 0.5, 0.95)
    assert algorithm.codec.error_feedback and algorithm.codec.compressor.k == 8
    from lightning_localsgd.fabric import DiLoCoStrategy as FabricDiLoCo

    fabric = FabricDiLoCo(period=8, fragments=2, sync_delay=1, compressor="int8")
    assert (fabric.algorithm.fragments, fabric.algorithm.round_lead_steps) == (2, 1)
    with pytest.raises(ValueError, match="multiple of `fragments=3`"):
        FabricDiLoCo(period=8, fragments=3)


def test_a_misspelt_strategy_name_gets_lightnings_error_and_the_docs_list_ours():
    # Lightning checks strategy names itself with no hook for a suggestion (docs/entry_points.md says so and
    # lists this package's names, which must all be registered with both the Trainer and Fabric).
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    with pytest.raises(ValueError, match="invalid strategy name: `strategy='vrl_sdg'`"):
        L.Trainer(accelerator="cpu", devices=2, strategy="vrl_sdg")
    ours = {
        "local_sgd",
        "vrl_sgd",
        "overlap_local_sgd",
        "cocod_sgd",
        "liec_sgd",
        "ef_sign",
        "dpsgd",
        "detag",
        "diloco",
        "stl_sgd",
        "hierarchical_local_sgd",
    }
    docs = (Path(__file__).parent.parent / "docs" / "entry_points.md").read_text()
    listed = docs.split("<!-- strategy names -->")[1].split("<!-- end -->")[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == ours
    assert ours <= set(StrategyRegistry.available_strategies())
    assert ours <= set(STRATEGY_REGISTRY.available_strategies())


@pytest.mark.parametrize("config", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_yaml_configures_the_strategy(config, tmp_path):
    pytest.importorskip("sklearn")  # the examples' data ship with scikit-learn (a dev dependency)
    from lightning_localsgd.demos.digits import DigitsCNN, DigitsDataModule

    cli = LightningCLI(
        DigitsCNN, DigitsDataModule, run=False, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    )
    assert isinstance(cli.trainer.strategy, lightning_localsgd.LocalUpdateStrategy)


def test_yaml_class_path_with_init_args(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 2\n  strategy:\n"
        "    class_path: lightning_localsgd.VRLSGDStrategy\n    init_args:\n      period: 7\n      warmup_steps: 3\n"
    )
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(config)])
    assert isinstance(cli.trainer.strategy, VRLSGDStrategy)
    assert (cli.trainer.strategy.algorithm.period, cli.trainer.strategy.algorithm.warmup_steps) == (7, 3)


def test_yaml_strategy_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: local_sgd\n")
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(config)])
    assert isinstance(cli.trainer.strategy, LocalSGDStrategy)


def test_example_cli_trains_for_real_from_yaml(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "cli.py"),
            "fit",
            "--config",
            str(EXAMPLES / "vrl_sgd.yaml"),
            "--trainer.max_steps",
            "30",
            "--trainer.strategy.init_args.period",
            "7",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`max_steps=30` reached" in proc.stdout + proc.stderr


def test_compressed_strategies_take_their_knobs_from_yaml():
    from lightning_localsgd import ErrorFeedbackStrategy, LIECSGDStrategy
    from lightning_localsgd.compression import TopK

    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(EXAMPLES / "liec_sgd.yaml")])
    assert isinstance(cli.trainer.strategy, LIECSGDStrategy)
    assert (cli.trainer.strategy.algorithm.full_sync_period, cli.trainer.strategy.algorithm.block_size_mb) == (32, 5.0)
    assert cli.trainer.strategy.algorithm.variance_reduction is False
    args = ["--config", str(EXAMPLES / "liec_sgd.yaml"), "--trainer.strategy.init_args.variance_reduction=true"]
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=args)
    assert cli.trainer.strategy.algorithm.variance_reduction is True
    assert cli.trainer.strategy.algorithm.server == "auto"
    args = ["--config", str(EXAMPLES / "liec_sgd.yaml"), "--trainer.strategy.init_args.server=sharded"]
    assert LightningCLI(BoringModel, BoringDataModule, run=False, args=args).trainer.strategy.algorithm.server == (
        "sharded"
    )
    args = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=lightning_localsgd.ErrorFeedbackStrategy",
        "--trainer.strategy.compressor=topk",
        "--trainer.strategy.compressor_options={ratio: 0.05}",
    ]
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=args)
    assert isinstance(cli.trainer.strategy, ErrorFeedbackStrategy)
    compressor = cli.trainer.strategy.algorithm.compressor
    assert isinstance(compressor, TopK) and compressor.ratio == 0.05


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lightning_localsgd.LIECSGDStrategy(full_sync_period=0), "`full_sync_period`"),
        (lambda: lightning_localsgd.LIECSGDStrategy(block_size_mb=-1), "`block_size_mb`"),
        (lambda: lightning_localsgd.LIECSGDStrategy(variance_reduction="yes"), "`variance_reduction`"),
        (lambda: lightning_localsgd.LIECSGDStrategy(server="central"), "`server` must be one of"),
        (lambda: lightning_localsgd.ErrorFeedbackStrategy(compressor="powersgd"), "`compressor` must be one of"),
        (lambda: lightning_localsgd.ErrorFeedbackStrategy(compressor_options={"levels": 3}), "Bad options"),
    ],
)
def test_compressed_strategies_refuse_bad_arguments_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_gossip_strategies_take_their_knobs_from_yaml():
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(EXAMPLES / "detag.yaml")])
    algorithm = cli.trainer.strategy.algorithm
    assert isinstance(algorithm, lightning_localsgd.DeTAG) and cli.trainer.strategy.world_size == 4
    assert (algorithm.topology_name, algorithm.gossip_rounds, algorithm.acceleration) == ("ring", 1, "auto")
    args = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=8",
        "--trainer.strategy=lightning_localsgd.DeTAGStrategy",
        "--trainer.strategy.topology=exponential",
        "--trainer.strategy.gossip_rounds=3",
        "--trainer.strategy.acceleration=0.2",
    ]
    algorithm = LightningCLI(BoringModel, BoringDataModule, run=False, args=args).trainer.strategy.algorithm
    assert (algorithm.topology_name, algorithm.gossip_rounds, algorithm.acceleration) == ("exponential", 3, 0.2)
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(EXAMPLES / "dpsgd.yaml")])
    assert cli.trainer.strategy.algorithm.gossip_order == "adapt_then_combine"


def test_diloco_takes_its_outer_optimizer_from_yaml():
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(EXAMPLES / "diloco.yaml")])
    algorithm = cli.trainer.strategy.algorithm
    assert isinstance(algorithm, lightning_localsgd.DiLoCo) and algorithm.period == 100
    assert (algorithm.outer_optimizer_name, algorithm.outer_optimizer_options) == (
        "SGD",
        {"lr": 0.7, "momentum": 0.9, "nesterov": True},
    )
    args = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=lightning_localsgd.DiLoCoStrategy",
        "--trainer.strategy.outer_optimizer=AdamW",
        "--trainer.strategy.outer_optimizer_options={lr: 0.3, betas: [0.9, 0.95]}",
        "--trainer.strategy.overlap=true",
    ]
    algorithm = LightningCLI(BoringModel, BoringDataModule, run=False, args=args).trainer.strategy.algorithm
    assert algorithm.outer_optimizer_name == "AdamW" and algorithm.outer_optimizer_options["lr"] == 0.3
    assert algorithm.overlap and not algorithm.rounds_synchronise


def test_stl_sgd_takes_its_stages_from_yaml():
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(EXAMPLES / "stl_sgd.yaml")])
    schedule = cli.trainer.strategy.algorithm.schedule
    assert (schedule.first_stage_steps, schedule.first_period) == (128, 4)
    assert schedule.period_growth == pytest.approx(2**0.5) and cli.trainer.strategy.algorithm.lr_decay == 0.5
