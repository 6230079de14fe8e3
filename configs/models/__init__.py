"""gin configs, a package so that gin finds `configs/...` paths (and their includes) from any directory."""
