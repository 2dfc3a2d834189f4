"""Entry file for launchers: `deepspeed launch/train.py CFG ...`, `torchrun ... launch/train.py CFG ...`,
`srun python launch/train.py CFG ...`. It only parses arguments and calls the library."""

import sys

from dist_ft.cli import main

if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    sys.exit(main(["train", *args]))
