"""Train the measuring networks the quickstarts need and write them into difflab's `metrics/readers/`
(shipped with the package, found under the same names as the cache's): the built-in digits' class-accuracy
yardstick and the 32-px `shapes` attribute reader. Run it when a change to either network's code, data or
settings changes its name (tests/test_shipped_readers.py fails until then); it prints what each measured on
images it never saw.

    python bench/ship_readers.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common import emit
from difflab.data import NATIVE_SIZE as TRAINING_SIZE
from difflab.data.shapes import NATIVE_SIZE
from difflab.metrics.attributes import load_or_train_attributes
from difflab.metrics.evaluate import Evaluator
from difflab.metrics.trained import SHIPPED


def main() -> None:
    cache = Path(tempfile.mkdtemp())
    os.environ["DIFFLAB_CACHE"] = str(cache)  # train afresh into an empty cache ...
    SHIPPED.mkdir(exist_ok=True)
    for old in SHIPPED.glob("*-*.*"):  # ... not from what ships now
        old.unlink()
    # what `difflab quickstart` and `quickstart --text` evaluate with
    digits = Evaluator.for_data("digits", TRAINING_SIZE["digits"], 1).classifier
    reader = load_or_train_attributes(NATIVE_SIZE)
    for file in sorted(cache.iterdir()):
        shutil.copyfile(file, SHIPPED / file.name)
    emit({"shipped": sorted(f.name for f in SHIPPED.iterdir()),
          "bytes": sum(f.stat().st_size for f in SHIPPED.iterdir()),
          "digits_test_accuracy": digits.test_accuracy, "reader_test_accuracy": reader.test_accuracy})


if __name__ == "__main__":
    main()
