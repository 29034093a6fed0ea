"""ffkern.bench: the benchmark harness behind ``ffkern bench``.

One job per module:
  providers  the implementations compared (reference eager, torch.compile of it, triton, cpp)
  timing     how a call is timed (CUDA events / wall clock) and its peak memory measured
  ceilings   the device's own limits, measured first (matmul rates, copy bandwidth)
  workload   flops and bytes each measurement counts, and the memory each provider needs
  devinfo    device name, memory, versions; the results folder's name
  worker     the subprocess that runs measurements (a fresh process per provider)
  measure    one measurement inside a worker: inputs, first call, timing, peak memory
  sweep      the ladders of sizes, the skip rules, the run
  report     terminal table, JSON, CSV and PNG plots under benchmarks/results/<device>/
  e2e        one CFF step on ViT[128 4 5]: paper-style loop against ffkern's layer-local trainer
  cli        ``ffkern bench`` (registered by ffkern/cli.py)
Importing this package imports neither torch.compile machinery nor triton.
"""
