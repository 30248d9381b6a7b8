"""Train a Bradley-Terry reward model.

    deepspeed train.py --config configs/quickstart.yaml [--section.key=value ...]
    torchrun --nproc_per_node 8 train.py --config ...      python train.py --config ...   (one process)
"""

import sys

from btrm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
