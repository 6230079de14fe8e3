"""Model families composed from `t5x_lite.nn` blocks; each file owns one family's params and forward."""
