"""Train a segmentor: ``python train.py --config configs/g2cbm.py --workdir runs/x``.

With no arguments it runs the demo (``configs/demo.py``): synthetic domain-shift data, a small
stand-in foundation ViT, and the demo's methods trained on the "synthetic" style and evaluated
on the unseen styles, each an ordinary ``train()`` run. Override any config value with
``--config.a.b=value``; a run resumes from the latest checkpoint in its workdir.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from recyclelora_jax import hugepages

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).resolve().parent / "configs" / "demo.py"),
    "Config file, optionally with arguments: configs/g2cbm.py:method=soma,smoke",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0, for multi-host runs without a cluster manager."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from recyclelora_jax import runner
    from recyclelora_jax.train.trainer import ConfigError, Preempted, train

    runner.quiet_library_logs()
    runner.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    cfg = _CONFIG.value
    workdir = Path(_WORKDIR.value or f"runs/{cfg.name}")
    try:
        if "demo" in cfg:  # the demo config: its data, its stand-in backbone, several runs
            from recyclelora_jax import compare, demo

            results = demo.run_demo(
                cfg,
                config_flags.get_config_filename(flags.FLAGS["config"]),
                config_flags.get_override_values(flags.FLAGS["config"]),
                workdir,
            )
            final = compare.means_over_seeds(results)
        else:
            results = train(cfg, workdir, runner.make_evaluator(cfg) if cfg.eval.datasets else None)
            final = results.get("miou", {})
    except Preempted as err:  # not a finished run: say so, and exit like a terminated process
        logging.error("interrupted: %s", err)
        sys.exit(128 + signal.SIGTERM)
    except ConfigError as err:
        raise app.UsageError(str(err)) from None
    logging.info("final: %s", json.dumps(final))


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before JAX allocates: XLA:CPU's buffers on huge pages
    app.run(main)
