"""Convert PyTorch TreeFlash/DFlash drafters to MLX: the same as ``python -m treeflash_mlx.convert``.

    python convert/convert.py --hf-path peerrh/treeflash-qwen3-4b --mlx-path treeflash-qwen3-4b-mlx
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from treeflash_mlx.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
