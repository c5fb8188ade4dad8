"""Build the tiny offline example: tokenizer, teacher, student, training data.

    python examples/tiny/build.py             # = axolotl-focus tiny; writes examples/tiny/build/
    axolotl train examples/tiny/focus.yml     # FOCUS-distill the student from the teacher
"""

import logging
import sys

from axolotl_focus.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(["tiny", *sys.argv[1:]]))
