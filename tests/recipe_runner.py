"""Train several axolotl configs one after another in ONE process (axolotl's own load_cfg and
train, exactly what `axolotl train` runs, minus ~20 s of imports per config).

    python tests/recipe_runner.py OUT.jsonl CONFIG.yml [CONFIG.yml ...]

Writes one JSON line per config to OUT.jsonl: {"config", "log_history"} or {"config", "error"}.
"""

import gc
import json
import sys
import traceback


def run(path: str) -> dict:
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets, load_preference_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train

    PluginManager.get_instance().plugins.clear()
    cfg = load_cfg(path)
    cli_args = TrainerCliArgs()
    meta = (load_preference_datasets if cfg.rl else load_datasets)(cfg=cfg, cli_args=cli_args)
    model, _, trainer = train(cfg=cfg, dataset_meta=meta)
    logs = trainer.state.log_history
    del model, trainer
    gc.collect()
    return {"config": path, "log_history": logs}


def main(argv: list[str]) -> int:
    out, configs = argv[0], argv[1:]
    with open(out, "w", encoding="utf-8") as handle:
        for path in configs:
            try:
                row = run(path)
            except Exception:  # noqa: BLE001 - reported per config, the test names it
                row = {"config": path, "error": traceback.format_exc()[-4000:]}
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            print(("FAILED " if "error" in row else "ok ") + path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
