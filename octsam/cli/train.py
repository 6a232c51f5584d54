"""``train.py`` / ``octsam-train``: fine-tune SAM + LoRA (or the U-Net baseline) from one YAML config plus overrides.

Single process: ``python train.py --config configs/amd.yaml``; N GPUs: ``accelerate launch --config_file
accelerate_config.yaml train.py --config configs/amd.yaml``.
"""

from __future__ import annotations

import sys

from octsam.config import parse_config
from octsam.errors import cli_main
from octsam.folders import disk_full_message, is_disk_full


@cli_main
def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse_config(argv)  # before torch is imported: --help stays quick
    import torch

    from octsam.training.loop import train

    try:
        train(model_args, data_args, train_args)
    except torch.cuda.OutOfMemoryError as err:
        print(
            f"error: the GPU ran out of memory ({err}). Lower --per-device-train-batch-size (the effective batch is "
            "kept by gradient accumulation) or add --gradient-checkpointing.",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        print(
            "interrupted; the last complete checkpoint is kept (resume with --resume-from-checkpoint latest).",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - only a full disk is handled here
        if not is_disk_full(err):
            raise
        print(
            f"error: {disk_full_message(err, train_args.output_dir)} The last complete checkpoint is intact: resume "
            "with --resume-from-checkpoint latest.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
