"""``python -m lit_compress fit --config configs/quickstart.yaml``."""

from lit_compress.cli import main

if __name__ == "__main__":
    main()
