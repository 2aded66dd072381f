"""``python -m dtm_ds export RUN_DIR OUT`` and ``python -m dtm_ds visualize RUN_DIR --out PNG``."""

import fire

from dtm_ds.pretrained import export
from dtm_ds.visualize import visualize

if __name__ == "__main__":
    fire.Fire({"export": export, "visualize": visualize})
