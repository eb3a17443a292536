"""The parity gate against a served-feature skew, on an exported run (one process).

usage: python tests/workers/parity_skew.py RUN BUNDLE WORK_DIR

Records real validation histories with the model's vectors, as the export does, then runs
the gate twice: as served, and with the predictor feeding device 0 for every event (the skew
the predictor once had). Prints {"served": report, "skewed": report}.
"""

import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from foundation.distributed.env import init_distributed
from foundation.eval.run import load_run
from foundation.export.bundle import Predictor
from foundation.export.exporter import write_parity_inputs
from foundation.export.parity import gate


def main() -> None:
    run_dir, bundle, work = (Path(a) for a in sys.argv[1:4])
    work.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir, "latest", init_distributed())
    settings = OmegaConf.create({"parity_split": "val", "batch_size": 128, "parity_batches": 1})
    write_parity_inputs(run, work, settings)
    served = gate(bundle, work)
    events = Predictor._events

    def device_zero(self, history):
        found = events(self, history)
        return {**found, "device": np.zeros_like(found["device"])}

    Predictor._events = device_zero
    print(json.dumps({"served": served, "skewed": gate(bundle, work)}))


if __name__ == "__main__":
    main()
