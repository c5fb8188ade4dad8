"""Build the tiny offline example: tokenizer, teacher, student, training data.

    python examples/tiny/build.py            # writes examples/tiny/build/
    axolotl train examples/tiny/focus.yml     # FOCUS-distill the student from the teacher
"""

import argparse
import logging

from axolotl_focus.micro import build_tiny_pair

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/tiny/build")
    parser.add_argument("--steps", type=int, default=200, help="teacher pretraining steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    paths = build_tiny_pair(args.out, steps=args.steps)
    print(f"teacher loss {paths['teacher_loss'][0]:.2f} -> {paths['teacher_loss'][-1]:.2f}")
    for key in ("teacher", "student", "train"):
        print(f"{key}: {paths[key]}")
