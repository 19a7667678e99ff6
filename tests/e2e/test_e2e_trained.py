"""End to end with models trained for a few seconds by the training package, exported
with the parity check, loaded by the encoder and searched through the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.stack_checks import run_scenario, scenario_images

pytestmark = [pytest.mark.e2e, pytest.mark.torch]


def test_detect_then_recommend_with_models_trained_here(tmp_path: Path) -> None:
    from copyfree_train.export_detect import export_detection_bundle
    from copyfree_train.export_retrieve import export_retrieval_bundle
    from copyfree_train.train_detect import DetectTrainConfig, train_detection
    from copyfree_train.train_retrieve import RetrieveTrainConfig, train_retrieval

    registry_dir, free_dir = scenario_images(tmp_path)
    detect_ckpt = train_detection(
        DetectTrainConfig(
            images=registry_dir,
            out=tmp_path / "detect-run",
            epochs=10,
            batch_size=8,
            holdout=0.0,
            threads=2,
        )
    )
    detection = export_detection_bundle(detect_ckpt, registry_dir, tmp_path / "detect")
    retrieve = train_retrieval(
        RetrieveTrainConfig(
            images=free_dir,
            out=tmp_path / "retrieve-run",
            bits=16,
            epochs=3,
            batch_size=8,
            hidden_dim=64,
            continuous_dim=16,
            val_fraction=0.15,
            query_fraction=0.15,
            map_k=10,
            fine_dim=8,
            max_steps=6,
            progress=False,
            threads=2,
        )
    )
    retrieval = export_retrieval_bundle(retrieve.checkpoint, tmp_path / "retrieve")
    run_scenario(tmp_path, detection, retrieval)
