"""``python -m ropescale inspect|plan|export ...``: the command lives in ``launch.rope_cli`` (it loads models, scores
candidates and draws pictures, which the ``ropescale`` package itself does not); this entry point only calls it."""

from launch.rope_cli import main
from utils.cli import exit_process

if __name__ == "__main__":
    exit_process(main())
