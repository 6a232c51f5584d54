"""Fine-tune SAM with LoRA on OCT B-scans.

python train.py --config configs/amd.yaml [--option value ...]
accelerate launch --config_file accelerate_config.yaml train.py --config configs/amd.yaml
"""

import sys

from octsam.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
