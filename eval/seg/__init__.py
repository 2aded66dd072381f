"""ADE20K semantic segmentation with mmsegmentation's UperNet over a dtm_ds encoder.

This package is the only place that imports mmseg/mmengine/mmcv. Importing it installs the mmcv-lite
shim (``mmcv_compat``) first, then registers ``DTMBEiT`` (backbone) and ``CheckSegLabels`` (transform).
"""

from eval.seg import mmcv_compat

mmcv_compat.install()
